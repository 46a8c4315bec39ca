# python recipes/shakespeare/baseline.py --data runs/demo/data
# A yardstick for the demo's genre classifier: TF-IDF of words and word pairs + logistic regression (scikit-learn,
# a test extra), trained on the same speeches and scored on the same held-out plays.
"""Bag-of-words baseline for the demo's comedy/tragedy classifier: prints its accuracy on eval.jsonl."""

import argparse
import json
from pathlib import Path


def read(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"), help="prepare.py's --output")
    args = parser.parse_args()
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise SystemExit("scikit-learn is not installed: pip install scikit-learn") from None
    missing = [name for name in ("train.jsonl", "eval.jsonl") if not (args.data / name).is_file()]
    if missing:
        raise SystemExit(f"--data {args.data} has no {' and no '.join(missing)}: run `make demo` first, or "
                         f".venv/bin/python recipes/shakespeare/prepare.py --output {args.data}")
    train_texts, train_labels = read(args.data / "train.jsonl")
    eval_texts, eval_labels = read(args.data / "eval.jsonl")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    model = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train_texts), train_labels)
    predicted = model.predict(vectorizer.transform(eval_texts))
    accuracy = sum(p == g for p, g in zip(predicted, eval_labels)) / len(eval_labels)
    print(f"TF-IDF + logistic regression: accuracy {accuracy:.1%} on {len(eval_labels)} held-out speeches")


if __name__ == "__main__":
    main()
