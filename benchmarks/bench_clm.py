"""CLM pretraining: GPT-2 6 layers x 384 (6 heads), block 256, batch 16, byte-level BPE 8192, Tiny Shakespeare.

Each round runs anchor_clm.py (Trainer fp32 = run_clm's default and Trainer bf16, the modes with goals; the tight
loop bf16, for information, in the first round only), measures the GEMM peak, then runs `llmkit pretrain`
(--precision auto) with the same model, data, batch and steps. Both time the same steps: the anchor skips 5 warm-up
steps and times the rest of its 18 (steps 7-18: it times from the end of step 6); llmkit logs every 6 steps and the
first window is skipped. Equal work: the Trainer prints its mean training loss at the end of each of the anchor's
Trainer runs; llmkit's mean over the same steps comes from its log windows.
"""

from __future__ import annotations

import re

from harness import (ANCHORS, DATA, PYTHON, Bench, BenchError, Outcome, alternate, at_least, bf16_missing, close,
                     gemm_peaks, llmkit_pretrain, llmkit_tokenize, median, mfu_text, not_run, precision_of,
                     runnable, threshold)

WORKLOAD = "CLM pretraining"
TEXT = f"{DATA}/tinyshakespeare/input.txt"
MODES = ("trainer-fp32", "trainer-bf16", "loop-bf16")  # loop-fp32 is not asked for: it would add 60 s a round
FIRST_ROUND_ONLY = ("loop-bf16",)  # no goal rests on it: once is enough, and it keeps the benchmark near 10 minutes
GOALS = {"trainer-fp32": 2.5, "trainer-bf16": 1.5, "loop-bf16": None}
LABELS = {"trainer-fp32": "Trainer fp32 (run_clm default)", "trainer-bf16": "Trainer bf16",
          "loop-bf16": "tight loop bf16"}
LAYERS, HIDDEN, HEADS, BLOCK, BATCH = 6, 384, 6, 256, 16
LEARNING_RATE = 6e-4  # the anchor's
LOG_EVERY = 6  # llmkit skips its first window of 6 steps; the anchor its first 5 steps and the step after them
MFU_GOAL = 0.5
LOSS_TOLERANCE = 0.03

PEAKS = re.compile(r"params ([\d.]+)M\s+peak fp32 (\d+) GF/s bf16 (\d+) GF/s")
FIGURE = re.compile(r"^((?:trainer|loop)-(?:fp32|bf16))\s+([\d.]+) tok/s")
TRAINER_LOSS = re.compile(r"'train_loss': '?([\d.]+)")  # the Trainer's own summary, printed before the mode's line


def default_rounds(quick: bool) -> int:
    return 1 if quick else 2


def run(bench: Bench) -> Outcome:
    steps = 7 if bench.quick else 18  # 7: the fewest with a timed step after the anchor's 5 warm-up steps
    tokenized = bench.work / "tok"
    llmkit_tokenize(bench, "llmkit tokenize (set-up)", ["--data", TEXT, "--output", tokenized, "--tokenizer-type",
                                                        "bpe", "--vocab-size", 8192, "--sample-by", "document"])
    peaks: list[dict[str, float]] = []
    here = runnable(MODES, ("trainer-bf16", "loop-bf16"))

    def anchor(r: int) -> dict:
        modes = tuple(m for m in here if r == 0 or m not in FIRST_ROUND_ONLY)
        done = bench.run(f"anchor round {r + 1}", [PYTHON, f"{ANCHORS}/anchor_clm.py", TEXT, steps, ",".join(modes)])
        return parse_anchor(done.stdout, modes)

    def llmkit(r: int) -> dict:
        peaks.append(gemm_peaks(0.3 if bench.quick else 1.5))
        return llmkit_pretrain(bench, f"llmkit round {r + 1}", tokenized, bench.work / f"run-{r + 1}",
                               objective="clm", size=["--model", "small", "--layers", LAYERS, "--hidden", HIDDEN,
                                                      "--heads", HEADS],
                               block=BLOCK, batch=BATCH, steps=steps, log_every=LOG_EVERY,
                               learning_rate=LEARNING_RATE)

    rounds = alternate(bench.rounds, {"anchor": anchor, "llmkit": llmkit})
    return compare(rounds["anchor"], rounds["llmkit"], peaks)


def parse_anchor(stdout: str, modes: tuple[str, ...]) -> dict:
    """Parameters, GEMM peaks, tok/s per mode, and the Trainer's mean training loss per Trainer mode."""
    peaks = PEAKS.search(stdout)
    figures, losses, loss = {}, {}, None
    for line in stdout.splitlines():
        if found := TRAINER_LOSS.search(line):
            loss = float(found[1])
        elif found := FIGURE.match(line):
            figures[found[1]] = float(found[2])
            if found[1].startswith("trainer"):
                losses[found[1]], loss = loss, None
    if peaks is None or set(figures) != set(modes) or None in losses.values():
        raise BenchError(f"anchor_clm.py printed no parameter count, peaks, figures or Trainer losses for "
                         f"{', '.join(modes)}:\n{stdout[-800:]}")
    return {"params": float(peaks[1]) * 1e6, "peaks": {"fp32": float(peaks[2]), "bf16": float(peaks[3])},
            "tokens_per_s": figures, "train_loss": losses}


def compare(anchors: list[dict], llmkits: list[dict], peaks: list[dict]) -> Outcome:
    params = llmkits[0]["parameters"]
    flops_per_token = 6 * params + 12 * LAYERS * HIDDEN * BLOCK  # anchor_clm.py's estimate
    # The highest peak measured in this run, by the harness before each llmkit run or by the anchor: the MFU
    # it gives is the lowest, so the goal is not met by a slow moment of the GEMM measurement.
    peak = {dtype: max(p[dtype] for p in [*peaks, *(a["peaks"] for a in anchors)]) for dtype in ("fp32", "bf16")}
    tps = median([l["rate"] for l in llmkits])
    ran = [mode for mode in MODES if any(mode in a["tokens_per_s"] for a in anchors)]
    anchor_tps = {mode: median([a["tokens_per_s"][mode] for a in anchors if mode in a["tokens_per_s"]])
                  for mode in ran}
    precision = precision_of(llmkits)  # what auto picked: MFU and losses against that dtype's
    mfu = tps * flops_per_token / (peak[precision] * 1e9)
    anchor_mfu = {mode: anchor_tps[mode] * flops_per_token / (peak[mode.split("-")[1]] * 1e9) for mode in ran}

    rows = [at_least(WORKLOAD, f"tok/s vs {LABELS[mode]}", tps, anchor_tps[mode], "tok/s", GOALS[mode],
                     mfu=mfu_text(mfu, anchor_mfu[mode])) if mode in ran else
            not_run(WORKLOAD, f"tok/s vs {LABELS[mode]}", tps, "tok/s", bf16_missing()) for mode in MODES]
    rows.append(threshold(WORKLOAD, f"MFU of the {precision} GEMM peak, llmkit's precision (anchor: Trainer "
                                    f"{precision})", mfu, "%", MFU_GOAL, reference=anchor_mfu[f"trainer-{precision}"],
                          note=f"peak fp32 {peak['fp32']:.0f} / bf16 {peak['bf16']:.0f} GF/s, "
                               f"{flops_per_token / 1e6:.1f} MFLOP/token"))
    llmkit_loss = median([l["mean_loss"] for l in llmkits])
    anchor_loss = median([a["train_loss"][f"trainer-{precision}"] for a in anchors])
    model_note = "" if abs(params - anchors[0]["params"]) < 0.01e6 else \
        f"MODEL DIFFERS: llmkit {params / 1e6:.2f}M vs anchor {anchors[0]['params'] / 1e6:.2f}M parameters"
    rows.append(close(WORKLOAD, f"equal work: mean train loss, steps 1-{llmkits[0]['plan']['steps']} (vs Trainer "
                                f"{precision})", llmkit_loss, anchor_loss, "loss", LOSS_TOLERANCE, note=model_note))
    figures = {"steps": llmkits[0]["plan"]["steps"], "timed_steps": llmkits[0]["timed_steps"], "parameters": params,
               "flops_per_token": flops_per_token, "peak_gflops": peak, "harness_peaks": peaks,
               "llmkit": {"tokens_per_s": tps, "rounds": [l["rate"] for l in llmkits], "precision": precision,
                          "mfu": mfu,
                          "losses": [[w["loss"] for w in l["windows"]] for l in llmkits]},
               "anchor": {"tokens_per_s": anchor_tps, "mfu": anchor_mfu, "rounds": anchors}}
    return Outcome(rows, figures)
