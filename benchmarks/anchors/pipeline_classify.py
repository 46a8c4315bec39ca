"""Anchor: classify the texts of a file with transformers' pipeline("text-classification") and its defaults.

Reads the text column of a .tsv (header `sentence<TAB>label`) or one text per line of a .txt, classifies all the
texts in one call, prints one JSON object per text (as `llmkit classify --json` does), and writes the inference
time (the pipeline call only, after loading) to --json.

Usage (from the project root): python benchmarks/anchors/pipeline_classify.py MODEL_DIR FILE --json OUT.json
"""
import argparse
import csv
import json
import sys
import time

from transformers import pipeline


def read_texts(path):
    with open(path, encoding="utf-8", newline="") as f:
        if not path.endswith(".tsv"):
            return [line.rstrip("\n") for line in f if line.strip()]
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        return [row[0] for row in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("file")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    texts = read_texts(a.file)
    classifier = pipeline("text-classification", model=a.model)
    start = time.perf_counter()
    results = classifier(texts)
    seconds = time.perf_counter() - start
    for text, result in zip(texts, results):
        sys.stdout.write(json.dumps({"text": text, "label": result["label"], "score": result["score"]}) + "\n")
    with open(a.json, "w") as f:
        json.dump({"texts": len(texts), "inference_seconds": seconds}, f)


if __name__ == "__main__":
    main()
