"""Classify the 872 SST-2 dev sentences (test.tsv; the first 128 with --quick) with a fine-tuned MiniLM classifier.

Set-up: `llmkit finetune` trains the classifier both sides use (2,000 rows; its accuracy does not matter here).
Each round runs four fresh processes in turn: transformers' pipeline("text-classification") with its defaults on
the file (anchors/pipeline_classify.py), `llmkit classify --file test.tsv --json`, the bare minimum to classify one
text (anchors/bare_classify.py: import transformers, load, one forward pass) and `llmkit classify "TEXT"`.
Throughput is texts / wall time of the whole process on both sides (start-up, loading, classifying, printing
one JSON line per text); inference alone is shown too: the pipeline's call timed inside its process, llmkit's as
the time the texts add to a one-text command. Equal work: the labels llmkit gives agree with the pipeline's.
"""

from __future__ import annotations

import csv
import json

from harness import (DATA, LLMKIT, MINILM, OUR_ANCHORS, PYTHON, ROOT, Bench, Outcome, alternate, at_least, at_most,
                     info, median, threshold)

WORKLOAD = "Classify SST-2 dev texts"
TEXTS = f"{DATA}/sst2/test.tsv"  # 872 texts; --quick takes the first QUICK_TEXTS
QUICK_TEXTS = 128  # the pipeline's one-text-at-a-time calls can take minutes on a busy machine
ONE_TEXT = "a gripping, funny film"
GOAL_TEXTS_PER_S, GOAL_COLD_START, AGREEMENT = 2.0, 1.3, 0.99


def default_rounds(quick: bool) -> int:
    return 1 if quick else 5


def run(bench: Bench) -> Outcome:
    model = bench.work / "classifier"
    texts = first_rows(TEXTS, QUICK_TEXTS, bench.work / "texts.tsv") if bench.quick else ROOT / TEXTS
    bench.run("llmkit finetune (set-up)", [*LLMKIT, "finetune", "--model", MINILM, "--data", f"{DATA}/sst2/train.tsv",
                                           "--max-samples", 256 if bench.quick else 2000, "--epochs", 1,
                                           "--validation-split", 0, "--output", model, "--quiet"])

    def pipeline(r: int) -> dict:
        out = bench.scratch("pipeline", ".json")
        done = bench.run(f"pipeline file round {r + 1}", [PYTHON, f"{OUR_ANCHORS}/pipeline_classify.py", model,
                                                          texts, "--json", out])
        return {**json.loads(out.read_text()), "seconds": done.seconds, "labels": labels_of(done.stdout)}

    def llmkit(r: int) -> dict:
        done = bench.run(f"llmkit file round {r + 1}", [*LLMKIT, "classify", "--file", texts, "--model", model,
                                                        "--json"])
        return {"seconds": done.seconds, "labels": labels_of(done.stdout)}

    def bare(r: int) -> float:
        return bench.run(f"bare one text round {r + 1}", [PYTHON, f"{OUR_ANCHORS}/bare_classify.py", model,
                                                          ONE_TEXT]).seconds

    def llmkit_one(r: int) -> float:
        return bench.run(f"llmkit one text round {r + 1}", [*LLMKIT, "classify", ONE_TEXT, "--model", model]).seconds

    sides = {"pipeline": pipeline, "llmkit": llmkit, "bare": bare, "llmkit_one": llmkit_one}
    if not bench.quick:
        alternate(1, sides)  # warm-up: page cache, datasets' cache of the .tsv
    return compare(alternate(bench.rounds, sides), gold_labels(texts))


def auto_precision() -> str:
    """What `--precision auto` picks on this machine, as llmkit classify resolves it."""
    import torch

    from llmkit.train import resolve_precision

    return resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def labels_of(stdout: str) -> list[str]:
    return [json.loads(line)["label"] for line in stdout.splitlines() if line.startswith("{")]


def first_rows(tsv: str, n: int, path):
    """The header and the first n rows of a .tsv, written to `path`."""
    with open(ROOT / tsv, encoding="utf-8") as f:
        lines = f.readlines()[: n + 1]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def gold_labels(path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        return [row[1] for row in rows]


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)


def compare(rounds: dict[str, list], gold: list[str]) -> Outcome:
    n = len(gold)
    llmkit_seconds = median([r["seconds"] for r in rounds["llmkit"]])
    pipeline_seconds = median([r["seconds"] for r in rounds["pipeline"]])
    cold, bare = median(rounds["llmkit_one"]), median(rounds["bare"])
    llmkit_inference = n / max(llmkit_seconds - cold, 1e-3)
    pipeline_inference = n / median([r["inference_seconds"] for r in rounds["pipeline"]])
    llmkit_labels, pipeline_labels = rounds["llmkit"][0]["labels"], rounds["pipeline"][0]["labels"]
    accuracy = {"llmkit": agreement(llmkit_labels, gold), "pipeline": agreement(pipeline_labels, gold)}
    rows = [
        at_least(WORKLOAD, f"texts/s, {n} texts, whole fresh process (vs pipeline defaults)", n / llmkit_seconds,
                 n / pipeline_seconds, "texts/s", GOAL_TEXTS_PER_S),
        info(WORKLOAD, "texts/s, inference only (llmkit: file command - one-text command)", llmkit_inference,
             pipeline_inference, "texts/s"),
        at_most(WORKLOAD, "cold start: classify one text (vs bare transformers load + classify)", cold, bare, "s",
                GOAL_COLD_START),
        threshold(WORKLOAD, "equal work: labels agreeing with the pipeline's", agreement(llmkit_labels,
                  pipeline_labels), "%", AGREEMENT,
                  note=f"accuracy: llmkit {accuracy['llmkit']:.1%}, pipeline {accuracy['pipeline']:.1%} "
                       f"(llmkit --precision auto: {auto_precision()}, pipeline fp32)"),
    ]
    figures = {"texts": n, "llmkit": {"file_seconds": llmkit_seconds, "one_text_seconds": cold,
                                      "inference_texts_per_s": llmkit_inference},
               "anchor": {"pipeline_file_seconds": pipeline_seconds, "bare_one_text_seconds": bare,
                          "pipeline_inference_texts_per_s": pipeline_inference},
               "accuracy": accuracy, "rounds": {k: [{kk: vv for kk, vv in r.items() if kk != "labels"}
                                                     if isinstance(r, dict) else r for r in v]
                                                 for k, v in rounds.items()}}
    return Outcome(rows, figures)
