"""`make demo`: the whole story on Shakespeare's plays, offline, printing each command so it can be rerun.

prepare the plays -> train a tokenizer -> pretrain a small GPT -> its perplexity on held-out plays ->
fine-tune a comedy/tragedy classifier -> evaluate it on the held-out plays -> classify a line.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from llmkit import display

LINE = "Is this a dagger which I see before me, the handle toward my hand?"


def run(args: list[str], shown: str) -> None:
    display.err.print(f"\n[bold cyan]$ {shown} {shlex.join(args)}[/bold cyan]", highlight=False)
    result = subprocess.run([sys.executable, *([] if shown == "python" else ["-m", "llmkit"]), *args])
    if result.returncode:
        raise SystemExit(result.returncode)


def main(root: str = "runs/demo") -> None:
    start = time.perf_counter()
    out = Path(root)
    data, tok, lm, clf = out / "data", out / "tokenizer", out / "lm", out / "genre"
    recipes = Path(__file__).resolve().parent.parent / "recipes" / "shakespeare"
    rel = recipes.relative_to(Path.cwd()) if recipes.is_relative_to(Path.cwd()) else recipes
    display.err.print("[bold]llmkit demo[/bold]: Shakespeare's plays, from raw text to a genre classifier. "
                      "Each step prints its command (run them yourself with .venv/bin/llmkit).")
    run([str(rel / "prepare.py"), "--output", str(data)], "python")
    run(["tokenize", "--recipe", str(rel / "tokenize.yaml"), "--data", str(data / "plays.txt"), "--output", str(tok)],
        "llmkit")
    run(["pretrain", "--recipe", str(rel / "pretrain.yaml"), "--data", str(tok), "--output", str(lm), "--overwrite"],
        "llmkit")
    run(["evaluate", "--model", str(lm), "--eval-data", str(data / "eval.jsonl")], "llmkit")  # plays it never saw
    run(["finetune", "--recipe", str(rel / "finetune.yaml"), "--model", str(lm), "--data", str(data / "train.jsonl"),
         "--eval-data", str(data / "eval.jsonl"), "--output", str(clf), "--overwrite"], "llmkit")
    run(["evaluate", "--model", str(clf / "best"), "--eval-data", str(data / "eval.jsonl")], "llmkit")
    run(["classify", LINE, "All's well that ends well, and merry be the wedding!", "--model", str(clf / "best"),
         "--top-k", "2"], "llmkit")
    display.err.print(f"\n[bold green]done[/bold green] in {time.perf_counter() - start:.0f} s; everything is in "
                      f"{out}/ (the models load with transformers' from_pretrained).")


if __name__ == "__main__":
    main()
