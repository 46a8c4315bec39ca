"""GPT-2 small (12 layers x 768, 12 heads, block 1024, ~124 M parameters) pretraining on one CUDA GPU: MFU.

The issue's GPU goal: >= 50 % MFU on one GPU (an H100 in the goal), against the GPU's bf16 peak measured in the same
run (an 8192^3 bf16 product timed with CUDA events before each llmkit run; the highest reading is used, which gives
the lowest MFU). FLOPs per token as anchor_clm.py counts them: 6 x parameters + 12 x layers x hidden x block. llmkit
runs as users run it (`llmkit pretrain --objective clm --model gpt2-small --precision auto`, its own defaults for the
rest), once eager and once with --compile, on a byte-level BPE of GPT-2's vocabulary size (50,257) trained by
`llmkit tokenize` on Tiny Shakespeare and WikiText-2 (the shared data: there is no Hub here). Batch 16 x 1,024
tokens, 40 steps, logged every 10: the first window (warm-up, compilation) is left out of the throughput. The
shared text is too small for BPE to learn 50,257 tokens (it stops at ~27,000), so the model has ~107 M parameters,
not 124 M: the row says MODEL DIFFERS, and its MFU counts the parameters the model has.
There is no anchor: the Trainer anchors run on the CPU (the other benchmarks hide CUDA devices from llmkit so that
both sides run on the same hardware).

Without a CUDA GPU the benchmark does not run (one row says so), except with --quick, which runs a tiny version on
the CPU (block 128, batch 2, 4 steps, eager only) to check the harness: its MFU is then against the CPU's peak.
"""

from __future__ import annotations

from harness import (DATA, LLMKIT, NO_EVAL_OR_CHECKPOINT, Bench, Outcome, Row, cuda_peak, gemm_peaks, info,
                     llmkit_tokenize, median, threshold, training_figures)

WORKLOAD = "GPT-2 small pretraining (GPU)"
CPU_ONLY = False  # this benchmark is the GPU's: llmkit sees the CUDA devices
TEXTS = [f"{DATA}/tinyshakespeare/input.txt", f"{DATA}/wikitext-2/valid.txt", f"{DATA}/wikitext-2/test.txt"]
VOCAB = 50257  # GPT-2's
LAYERS, HIDDEN = 12, 768  # the gpt2-small preset
MFU_GOAL = 0.5


def default_rounds(quick: bool) -> int:
    return 1 if quick else 2  # eager, then compiled


def run(bench: Bench) -> Outcome:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not bench.quick:
        why = "not run: no CUDA GPU here (--quick runs a tiny version on the CPU, to check the harness)"
        return Outcome([Row(WORKLOAD, "MFU of the GPU's bf16 peak, GPT-2 small", None, None, "%",
                            goal=f">= {MFU_GOAL * 100:g} %", note=why, skipped=True)], {"reason": why})
    block, batch, steps, log_every = (128, 2, 4, 2) if bench.quick else (1024, 16, 40, 10)
    tokenized = bench.work / "tok"
    data = [arg for text in TEXTS for arg in ("--data", text)]
    summary, _ = llmkit_tokenize(bench, "llmkit tokenize (set-up)", [*data, "--output", tokenized, "--tokenizer-type",
                                                                     "bpe", "--vocab-size", VOCAB, "--sample-by",
                                                                     "document"])
    runs: dict[str, dict] = {}
    peaks: list[float] = []
    for r in range(bench.rounds):
        mode = "compiled" if r % 2 else "eager"
        if gpu:
            measured = cuda_peak(0.3 if bench.quick else 1.0)
            torch.cuda.empty_cache()
            peaks.append(measured["bf16"])
        else:
            measured = {"gpu": "none (CPU, --quick)", **gemm_peaks(0.3)}
        output = bench.work / f"run-{mode}-{r + 1}"
        bench.run(f"llmkit pretrain {mode} round {r + 1}",
                  [*LLMKIT, "pretrain", "--data", tokenized, "--output", output, "--objective", "clm",
                   "--model", "gpt2-small", "--block-size", block, "--global-batch-size", batch,
                   "--max-steps", steps, "--log-every", log_every, "--precision", "auto",
                   *(["--compile"] if mode == "compiled" else []), *NO_EVAL_OR_CHECKPOINT,
                   "--validation-split", "0", "--overwrite", "--quiet"])
        figures = training_figures(output, "tokens_per_second")
        runs.setdefault(mode, {"rounds": []})["rounds"].append(figures["rate"])
        runs[mode].update(parameters=figures["parameters"], precision=figures["plan"]["precision"],
                          device=measured["gpu"], timed_steps=figures["timed_steps"])
        if not gpu:
            peaks.append(measured[figures["plan"]["precision"]])
    parameters = next(iter(runs.values()))["parameters"]
    flops_per_token = 6 * parameters + 12 * LAYERS * HIDDEN * block
    peak = max(peaks)
    for figures in runs.values():
        figures["tokens_per_s"] = median(figures["rounds"])
        figures["mfu"] = figures["tokens_per_s"] * flops_per_token / (peak * 1e9)
    best = max(runs, key=lambda mode: runs[mode]["mfu"])
    device = runs[best]["device"]
    note = (f"{device}; peak {peak:,.0f} GF/s ({'bf16 8192^3' if gpu else 'CPU, quick'}); "
            f"{parameters / 1e6:.1f}M parameters, {flops_per_token / 1e6:.0f} MFLOP/token, block {block}, "
            f"batch {batch}")
    if summary["vocab_size"] != VOCAB:  # the shared text is too small for 50,257 merges
        note += (f"; MODEL DIFFERS from GPT-2 small (124.4M): vocabulary {summary['vocab_size']:,}, what BPE learns "
                 f"from the shared data, not {VOCAB:,}")
    rows = [threshold(WORKLOAD, f"MFU of the peak, llmkit {runs[best]['precision']} ({best}, the better)",
                      runs[best]["mfu"], "%", MFU_GOAL, note=note)]
    rows += [info(WORKLOAD, f"tok/s, {mode}", figures["tokens_per_s"], None, "tok/s",
                  mfu=f"{figures['mfu'] * 100:.0f}%") for mode, figures in runs.items()]
    return Outcome(rows, {"device": device, "vocab_size": summary["vocab_size"], "peak_gflops": peak, "peaks": peaks, "parameters": parameters,
                          "flops_per_token": flops_per_token, "block": block, "batch": batch, "steps": steps,
                          "runs": runs})
