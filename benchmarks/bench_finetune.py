"""Fine-tuning all-MiniLM-L6-v2 on SST-2, batch 32: throughput.

Each round runs anchor_finetune.py twice - config a (run_glue's default: pad to 128, fp32; 25 steps, the first 10
warm-up, as its steps are slow and steady) and configs c (dynamic padding + bf16 + group_by_length) and c32 (c in
fp32, the best Trainer configuration on CPUs whose bf16 products are slow) with 150 steps, of which the first 50
(one megabatch of the Trainer's length grouping, which orders each megabatch longest first) are warm-up; config b
(dynamic padding + bf16, no length grouping: never the best, so no goal rests on it) joins a in the first round -
then `llmkit finetune` (its defaults: --precision auto, dynamic padding, length grouping) for one epoch on the
anchor's accuracy subset: the first 8,000 rows of train.tsv shuffled with seed 42, as anchor_finetune.py picks them,
written to a file (same learning rate 1e-4, linear decay, no warm-up, no weight decay, max length 128). llmkit logs
every 25 steps; the first window is skipped. Equal work: real (unpadded) tokens per sample - llmkit's must be no
fewer than the anchor's (timing whole megabatches, the anchor's window averages the data's lengths; steps 11-100
would skip the longest batches and average 11.8 tokens against the data's 13.3); real tokens/s, the ratio corrected
for lengths, is shown beside. Accuracy, which one seed cannot settle, is the `accuracy` benchmark's (bench_accuracy:
the same runs, over several seeds).
"""

from __future__ import annotations

import csv
import json

from harness import (ANCHORS, DATA, LLMKIT, MINILM, NO_EVAL_OR_CHECKPOINT, PYTHON, ROOT, TRAINER_OPTIMIZER, Bench,
                     Outcome, alternate, at_least, bf16_missing, info, median, not_run, precision_of,
                     runnable, training_figures)

WORKLOAD = "Fine-tuning MiniLM SST-2"
SST2 = f"{DATA}/sst2"
BATCH, WARMUP, SEED, MAX_LENGTH = 32, 10, 42, 128
# The Trainer's length grouping orders each megabatch of 50 batches longest first: timing whole megabatches (steps
# 51-150, after the first as warm-up) times the data's lengths, where steps 11-100 would skip the longest batches
MEGABATCH = 50
GROUPED = ("c", "c32")  # the length-grouped configurations, timed over whole megabatches
LEARNING_RATE = 1e-4  # llmkit's default for this model; the anchors' README shows it beats their 2e-5
CONFIGS = {"a": "(a) run_glue default: pad 128, fp32", "b": "(b) dynamic padding + bf16",
           "c": "(c) b + group_by_length", "c32": "(c32) c in fp32"}
BF16_CONFIGS = ("b", "c")
GOAL_VS_A, GOAL_VS_BEST, TOKENS_TOLERANCE = 25, 1.3, 0.05


def default_rounds(quick: bool) -> int:
    return 1 if quick else 2


def run(bench: Bench) -> Outcome:
    rows = 256 if bench.quick else 8000
    steps_a = WARMUP + 1 if bench.quick else 25
    grouped = (WARMUP + 2, WARMUP) if bench.quick else (3 * MEGABATCH, MEGABATCH)  # steps, warm-up
    log_every = 4 if bench.quick else 25
    subset = write_anchor_subset(bench.work / "train-subset.tsv", rows, SEED)
    here = runnable(CONFIGS, BF16_CONFIGS)
    length_grouped = ",".join(name for name in GROUPED if name in here)

    def anchor(r: int) -> dict:
        # b's order is not length-grouped: a short window times its lengths
        short = ",".join(name for name in ("a", "b") if name in here and (r == 0 or name == "a"))
        timed = anchor_finetune(bench, f"anchor round {r + 1} ({short})", short, steps_a, WARMUP,
                                ["--no-accuracy"])["throughput"]
        timed.update(anchor_finetune(bench, f"anchor round {r + 1} ({length_grouped})", length_grouped, *grouped,
                                     ["--no-accuracy"])["throughput"])
        return timed

    def llmkit(r: int) -> dict:
        return llmkit_finetune(bench, f"llmkit round {r + 1}", subset, bench.work / f"run-{r + 1}", log_every, SEED)

    rounds = alternate(bench.rounds, {"anchor": anchor, "llmkit": llmkit})
    return compare(rounds["anchor"], rounds["llmkit"], rows)


def llmkit_finetune(bench: Bench, label: str, subset, output, log_every: int, seed: int,
                    precision: str = "auto") -> dict:
    """`llmkit finetune` with its defaults for one epoch on `subset`, scored on test.tsv at the end, with the
    anchor's batch, learning rate, schedule and maximum length; its training figures."""
    bench.run(label, [
        *LLMKIT, "finetune", "--model", MINILM, "--data", subset, "--eval-data", f"{SST2}/test.tsv",
        "--epochs", 1, "--global-batch-size", BATCH, "--max-length", MAX_LENGTH, "--learning-rate",
        LEARNING_RATE, *TRAINER_OPTIMIZER, *NO_EVAL_OR_CHECKPOINT, "--log-every", log_every,
        "--precision", precision, "--validation-split", 0, "--seed", seed, "--output", output, "--overwrite", "--quiet"])
    return training_figures(output, "samples_per_second")


def anchor_finetune(bench: Bench, label: str, configs: str, steps: int, warmup: int, extra: list) -> dict:
    out = bench.scratch("anchor", ".json")
    bench.run(label, [PYTHON, f"{ANCHORS}/anchor_finetune.py", "--model", MINILM, "--data", SST2, "--configs",
                      configs, "--steps", steps, "--warmup", warmup, "--json", out, *extra])
    return json.loads(out.read_text())


def write_anchor_subset(path, rows: int, seed: int):
    """The rows anchor_finetune.py trains on for accuracy with --seed `seed`: train.tsv read as it reads it, then
    Dataset.shuffle(seed=seed).select(range(rows)) - shuffling row numbers gives the same permutation."""
    from datasets import Dataset

    with open(ROOT / SST2 / "train.tsv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        records = list(reader)
    order = Dataset.from_dict({"row": list(range(len(records)))}).shuffle(seed=seed).select(
        range(min(rows, len(records))))["row"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        f.writelines("\t".join(records[i]) + "\n" for i in order)
    return path


def real_tokens_per_sample(figures: dict) -> float:
    """Unpadded tokens per training example over the timed windows (llmkit counts attention-mask tokens)."""
    ends = [w["step"] for w in figures["windows"]]
    timed = list(zip([b - a for a, b in zip(ends, ends[1:])], figures["windows"][1:]))
    return sum(s * w["tokens_per_second"] / w["samples_per_second"] for s, w in timed) / sum(s for s, _ in timed)


def compare(anchors: list[dict], llmkits: list[dict], subset_rows: int) -> Outcome:
    sps = median([l["rate"] for l in llmkits])
    anchor_sps = {name: median([a[name]["samples_per_s"] for a in anchors if name in a])
                  for name in CONFIGS if any(name in a for a in anchors)}
    best = max(anchor_sps, key=anchor_sps.get)
    rows = [at_least(WORKLOAD, f"samples/s vs {desc}", sps, anchor_sps[name], "samples/s",
                     GOAL_VS_A if name == "a" else GOAL_VS_BEST if name == best else None,
                     note="the best Trainer configuration" if name == best else "") if name in anchor_sps else
            not_run(WORKLOAD, f"samples/s vs {desc}", sps, "samples/s", bf16_missing())
            for name, desc in CONFIGS.items()]
    grouped = "c" if "c" in anchor_sps else "c32"  # c32 pads and groups as c does
    llmkit_tokens = median([real_tokens_per_sample(l) for l in llmkits])
    anchor_tokens = median([r["real_tokens_per_step"] / BATCH for a in anchors for r in a[grouped]["rounds"]])
    rows.append(at_least(WORKLOAD, f"equal work: real tokens per sample (vs {grouped}), at least", llmkit_tokens,
                         anchor_tokens, "tok", 1 - TOKENS_TOLERANCE,
                         note="the anchor's timed steps 51-150 of its length-grouped order over all of train.tsv; "
                              f"llmkit's epoch over the {subset_rows:,} rows"))
    anchor_real_tps = median([a[grouped]["real_tokens_per_s"] for a in anchors])
    rows.append(info(WORKLOAD, f"real (unpadded) tokens/s vs ({grouped})", sps * llmkit_tokens, anchor_real_tps,
                     "tok/s", note="the samples/s ratio corrected for the samples' lengths"))
    figures = {"rows": subset_rows, "steps": llmkits[0]["plan"]["steps"], "timed_steps": llmkits[0]["timed_steps"],
               "llmkit": {"samples_per_s": sps, "rounds": [l["rate"] for l in llmkits],
                          "precision": precision_of(llmkits),
                          "accuracies": [l["eval"]["eval_accuracy"] for l in llmkits],
                          "real_tokens_per_sample": llmkit_tokens,
                          "losses": [[w["loss"] for w in l["windows"]] for l in llmkits]},
               "anchor": {"samples_per_s": anchor_sps, "best": best, "rounds": anchors,
                          f"real_tokens_per_sample_{grouped}": anchor_tokens}}
    return Outcome(rows, figures)
