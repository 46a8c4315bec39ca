"""MLM pretraining: BERT 4 layers x 256, 4 heads, FFN 1024, seq 128, batch 32, WordPiece 8192, 15 % masking.

Each round runs anchor_mlm.py once (--repeats 1: Trainer fp32 = run_mlm's default, then Trainer bf16) and then
`llmkit pretrain --objective mlm` (--precision auto) with the same model, data (Tiny Shakespeare + WikiText-2 valid
and test, by line, lower-cased WordPiece), batch and steps. Both time steps 11-60: the anchor skips --warmup 10
steps, llmkit logs every 10 steps and its first window is skipped. Equal work: the anchor prints its mean training
loss over the run; llmkit's mean over the same steps comes from its log windows.
"""

from __future__ import annotations

import json

from harness import (ANCHORS, DATA, OUR_ANCHORS, PYTHON, Bench, Outcome, alternate, at_least, bf16_missing, close,
                     gemm_peaks, info, llmkit_pretrain, llmkit_tokenize, median, mfu_text, not_run, precision_of,
                     runnable)

WORKLOAD = "MLM pretraining"
SHAKESPEARE, WIKITEXT = f"{DATA}/tinyshakespeare/input.txt", f"{DATA}/wikitext-2"
PRECISIONS = ("fp32", "bf16")
GOALS = {"fp32": 2.5, "bf16": 1.5}
LABELS = {"fp32": "Trainer fp32 (run_mlm default)", "bf16": "Trainer bf16"}
# `base` only for its 512 positions, the anchor's max_position_embeddings; the flags give the anchor's size
# (llmkit's FFN is 4 x hidden = 1024).
SIZE = ["--model", "base", "--layers", 4, "--hidden", 256, "--heads", 4]
BLOCK, BATCH, WARMUP = 128, 32, 10
LEARNING_RATE = 5e-4  # the anchor's
LOSS_TOLERANCE = 0.03


def default_rounds(quick: bool) -> int:
    return 1 if quick else 2


def run(bench: Bench) -> Outcome:
    steps = WARMUP + 2 if bench.quick else 60
    tokenized = bench.work / "tok"
    llmkit_tokenize(bench, "llmkit tokenize (set-up)",
                    ["--data", SHAKESPEARE, "--data", f"{WIKITEXT}/valid.txt", "--data", f"{WIKITEXT}/test.txt",
                     "--output", tokenized, "--tokenizer-type", "wordpiece", "--lowercase", "--vocab-size", 8192,
                     "--sample-by", "line"])
    peaks: list[dict[str, float]] = []
    precisions = ",".join(runnable(PRECISIONS, ("bf16",)))

    def anchor(r: int) -> dict:
        out = bench.work / f"anchor-{r + 1}.json"
        # where bf16 is emulated, the anchor's bf16 GEMM peak from one product (benchmarks/anchors/fp32_peak_only.py)
        runner = [PYTHON, f"{OUR_ANCHORS}/fp32_peak_only.py"] if bf16_missing() else [PYTHON]
        bench.run(f"anchor round {r + 1}", [*runner, f"{ANCHORS}/anchor_mlm.py", "--shakespeare", SHAKESPEARE,
                                            "--wikitext", WIKITEXT, "--steps", steps, "--warmup", WARMUP,
                                            "--repeats", 1, "--precisions", precisions, "--json", out])
        return json.loads(out.read_text())

    def llmkit(r: int) -> dict:
        peaks.append(gemm_peaks(0.3 if bench.quick else 1.5))
        return llmkit_pretrain(bench, f"llmkit round {r + 1}", tokenized, bench.work / f"run-{r + 1}",
                               objective="mlm", size=SIZE, block=BLOCK, batch=BATCH, steps=steps,
                               log_every=WARMUP, learning_rate=LEARNING_RATE)

    rounds = alternate(bench.rounds, {"anchor": anchor, "llmkit": llmkit})
    return compare(rounds["anchor"], rounds["llmkit"], peaks)


def compare(anchors: list[dict], llmkits: list[dict], peaks: list[dict]) -> Outcome:
    params = llmkits[0]["parameters"]
    # The highest GEMM peak measured in this run (harness or anchor): the lowest, most careful MFU.
    peak = {dtype: max(p[dtype] for p in [*peaks, *(a["peak_used"] for a in anchors)]) for dtype in PRECISIONS}
    tps = median([l["rate"] for l in llmkits])
    ran = [prec for prec in PRECISIONS if prec in anchors[0]["summary"]]
    anchor_tps = {prec: median([a["summary"][prec]["tokens_per_s"] for a in anchors]) for prec in ran}
    precision = precision_of(llmkits)  # what auto picked: MFU and losses against that dtype's
    mfu = 6 * params * tps / (peak[precision] * 1e9)  # anchor_mlm.py's estimate: 6 N per token
    anchor_mfu = {prec: 6 * anchors[0]["params"] * anchor_tps[prec] / (peak[prec] * 1e9) for prec in ran}
    skipped = "llmkit computes vocabulary logits at masked positions only: same loss, fewer FLOPs than 6N counts"
    rows = [at_least(WORKLOAD, f"tok/s vs {LABELS[prec]}", tps, anchor_tps[prec], "tok/s", GOALS[prec],
                     mfu=mfu_text(mfu, anchor_mfu[prec])) if prec in ran else
            not_run(WORKLOAD, f"tok/s vs {LABELS[prec]}", tps, "tok/s", bf16_missing()) for prec in PRECISIONS]
    rows.append(info(WORKLOAD, f"MFU of the {precision} GEMM peak, 6N, llmkit's precision (anchor: Trainer "
                               f"{precision})", mfu, anchor_mfu[precision], "%", note=skipped))
    llmkit_loss = median([l["mean_loss"] for l in llmkits])
    anchor_loss = median([r["train_loss"] for a in anchors for r in a["summary"][precision]["rounds"]])
    first, last = 1, llmkits[0]["plan"]["steps"]
    model_note = "" if params == anchors[0]["params"] else \
        f"MODEL DIFFERS: llmkit {params:,} vs anchor {anchors[0]['params']:,} parameters"
    rows.append(close(WORKLOAD, f"equal work: mean train loss, steps {first}-{last} (vs Trainer {precision})",
                      llmkit_loss, anchor_loss, "loss", LOSS_TOLERANCE, note=model_note))
    figures = {"steps": last, "timed_steps": llmkits[0]["timed_steps"], "parameters": params, "peak_gflops": peak,
               "harness_peaks": peaks,
               "llmkit": {"tokens_per_s": tps, "rounds": [l["rate"] for l in llmkits], "precision": precision,
                          "mfu_6n": mfu,
                          "losses": [[w["loss"] for w in l["windows"]] for l in llmkits]},
               "anchor": {"tokens_per_s": anchor_tps, "mfu_6n": anchor_mfu, "rounds": anchors}}
    return Outcome(rows, figures)
