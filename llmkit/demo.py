"""`make demo`: the whole story on Shakespeare's plays, offline, printing each command so it can be rerun.

prepare the plays -> train a tokenizer -> pretrain a small GPT -> its perplexity on held-out plays ->
fine-tune a comedy/tragedy classifier -> evaluate it on the held-out plays -> classify a line.

    python -m llmkit.demo [--root runs/demo] [--quick]

--quick tells the same story on tiny budgets (a tiny model, a few steps, part of the plays: about a minute):
a test that every step runs and hands the next one what it needs, not a model worth anything.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import subprocess
import sys
import time
from pathlib import Path

from llmkit import display

LINE = "Is this a dagger which I see before me, the handle toward my hand?"
# --quick: flags added to a step's command (after the recipe's, so they win); the recipes are left as they are.
# Only speeches of 80 words or more for the classifier (about 460 to train on, 160 held out, both genres).
QUICK = {"prepare": ["--min-words", "80"],
         "tokenize": ["--vocab-size", "2048", "--max-samples", "5000"],
         "pretrain": ["--model", "tiny", "--max-steps", "8", "--eval-every", "4", "--eval-batches", "2"],
         "finetune": ["--max-steps", "6", "--eval-every", "3", "--eval-batches", "2"]}


def run(args: list[str], shown: str = "llmkit", quick: bool = False) -> None:
    """Print the command, then run it: `python SCRIPT ...` or `llmkit COMMAND ...` (with --quick's flags)."""
    if quick:
        args = [*args, *QUICK.get(Path(args[0]).stem if shown == "python" else args[0], [])]
    # soft_wrap: the command stays on one line, to be copied, however narrow the terminal or log
    display.err.print(f"\n[bold cyan]$ {shown} {shlex.join(args)}[/bold cyan]", highlight=False, soft_wrap=True)
    result = subprocess.run([sys.executable, *([] if shown == "python" else ["-m", "llmkit"]), *args])
    if result.returncode:
        raise SystemExit(result.returncode)


def main(root: str = "runs/demo", quick: bool = False) -> None:
    start = time.perf_counter()
    out = Path(root)
    data, tok, lm, clf = out / "data", out / "tokenizer", out / "lm", out / "genre"
    recipes = Path(__file__).resolve().parent.parent / "recipes" / "shakespeare"
    rel = recipes.relative_to(Path.cwd()) if recipes.is_relative_to(Path.cwd()) else recipes
    step = functools.partial(run, quick=quick)
    display.info("[bold]llmkit demo[/bold]: Shakespeare's plays, from raw text to a genre classifier. "
                 "Each step prints its command (run them yourself with .venv/bin/llmkit)."
                 + (" [yellow]--quick: tiny budgets, the figures mean nothing.[/yellow]" if quick else ""))
    step([str(rel / "prepare.py"), "--output", str(data)], "python")
    step(["tokenize", "--recipe", str(rel / "tokenize.yaml"), "--data", str(data / "plays.txt"), "--output", str(tok)])
    step(["pretrain", "--recipe", str(rel / "pretrain.yaml"), "--data", str(tok), "--output", str(lm), "--overwrite"])
    step(["evaluate", "--model", str(lm), "--eval-data", str(data / "eval.jsonl"),  # plays it never saw
          "--output", str(out / "lm-eval.json")])
    step(["finetune", "--recipe", str(rel / "finetune.yaml"), "--model", str(lm), "--data", str(data / "train.jsonl"),
          "--eval-data", str(data / "eval.jsonl"), "--output", str(clf), "--overwrite"])
    step(["evaluate", "--model", str(clf / "best"), "--eval-data", str(data / "eval.jsonl"),
          "--output", str(out / "genre-eval.json")])
    step(["classify", LINE, "All's well that ends well, and merry be the wedding!", "--model", str(clf / "best"),
          "--top-k", "2"])
    display.info(f"\n[bold green]done[/bold green] in {time.perf_counter() - start:.0f} s; everything is in "
                 f"{out}/ (the models load with transformers' from_pretrained).")


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmkit.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="Directory for everything the demo makes.")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets: checks the story runs (about a minute).")
    args = parser.parse_args(argv)
    main(args.root, args.quick)


if __name__ == "__main__":
    cli()
