"""Tokenize + pack: Tiny Shakespeare + WikiText-2 valid + test, x4 (14 MB, 3.7 M tokens), BPE 8192, 512-token blocks.

Each round runs anchor_tokenize.py once (--repeats 1; variants a1/a2 = datasets.map as run_clm.py does it with
num_proc 1 / 2, b = the raw limit Tokenizer.encode_batch in one call + numpy, bf = encode_batch_fast), then
`llmkit tokenize` on the same corpus written to a file, one document per line as run_clm.py reads it, with a BPE
8192 llmkit trained once on the x1 corpus (as the anchor trains its own), a fresh cache and a fresh --output. The
figure is the tokens_per_second llmkit prints (reading, encoding and writing the Arrow cache; packing is free: the
blocks are slices of the token stream). Memory: llmkit's peak RSS (from wait4) on the x4 corpus in the rounds and
on an x32 corpus once. Equal work: tokens produced, against the anchor's.
"""

from __future__ import annotations

import json
import shutil

from harness import (ANCHORS, DATA, PYTHON, ROOT, Bench, Outcome, alternate, at_least, at_most, close, info,
                     llmkit_tokenize, median)

WORKLOAD = "Tokenize + pack"
SHAKESPEARE, WIKITEXT = f"{DATA}/tinyshakespeare/input.txt", f"{DATA}/wikitext-2"
VARIANTS = ("a1", "a2", "b", "bf")
GOAL_VS_RUN_CLM, GOAL_VS_RAW, MEMORY_GOAL, TOKENS_TOLERANCE = 2.0, 0.8, 1.3, 0.05


def default_rounds(quick: bool) -> int:
    return 1 if quick else 3


def run(bench: Bench) -> Outcome:
    repeat, large = (1, 2) if bench.quick else (4, 32)
    text = "".join((ROOT / p).read_text(encoding="utf-8")
                   for p in (SHAKESPEARE, f"{WIKITEXT}/valid.txt", f"{WIKITEXT}/test.txt"))  # as the anchor joins them
    corpus = {n: write_corpus(bench, text, n) for n in (1, repeat, large)}
    tokenizer = bench.work / "bpe"
    llmkit_tokenize(bench, "llmkit tokenizer (set-up)", ["--data", corpus[1], "--output", tokenizer,
                                                         "--tokenizer-type", "bpe", "--vocab-size", 8192,
                                                         "--sample-by", "line"])

    def anchor(r: int) -> dict:
        out = bench.scratch("anchor", ".json")
        bench.run(f"anchor round {r + 1}", [PYTHON, f"{ANCHORS}/anchor_tokenize.py", "--shakespeare", SHAKESPEARE,
                                            "--wikitext", WIKITEXT, "--tokenizers", "bpe", "--repeat-text", repeat,
                                            "--repeats", 1, "--variants", ",".join(VARIANTS), "--json", out])
        return json.loads(out.read_text())["results"]["bpe8192"]

    def llmkit(label: str, n: int) -> dict:
        """Tokenize the xN corpus afresh: a new cache and a new --output, so nothing is reused."""
        summary, done = llmkit_tokenize(bench, label, ["--data", corpus[n], "--tokenizer", tokenizer, "--output",
                                                       bench.scratch("out"), "--sample-by", "line"],
                                        env=bench.env(LLMKIT_CACHE=str(bench.scratch("cache"))))
        return {**summary, "command_seconds": done.seconds, "max_rss_mb": done.max_rss_mb}

    rounds = alternate(bench.rounds, {"anchor": anchor,
                                      "llmkit": lambda r: llmkit(f"llmkit x{repeat} round {r + 1}", repeat)})
    big = llmkit(f"llmkit x{large} (memory)", large)
    shutil.rmtree(big["output"])  # a quarter of a gigabyte of scratch
    corpus[large].unlink()
    return compare(rounds["anchor"], rounds["llmkit"], big, repeat, large)


def write_corpus(bench: Bench, text: str, repeat: int):
    path = bench.work / f"corpus-x{repeat}.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.write(text)
    return path


def compare(anchors: list[dict], llmkits: list[dict], big: dict, repeat: int, large: int) -> Outcome:
    tps = median([l["tokens_per_second"] for l in llmkits])
    anchor_tps = {v: median([a[v]["tokens_per_s"] for a in anchors]) for v in VARIANTS}
    run_clm = max(("a1", "a2"), key=anchor_tps.get)
    end_to_end = median([l["tokens"] / l["command_seconds"] for l in llmkits])
    rss = median([l["max_rss_mb"] for l in llmkits])
    rows = [
        at_least(WORKLOAD, f"tok/s vs datasets.map as run_clm.py (num_proc {run_clm[1]}, the faster)", tps,
                 anchor_tps[run_clm], "M tok/s", GOAL_VS_RUN_CLM),
        at_least(WORKLOAD, "tok/s vs raw Tokenizer.encode_batch + numpy (the limit)", tps, anchor_tps["b"],
                 "M tok/s", GOAL_VS_RAW),
        at_least(WORKLOAD, "tok/s vs Tokenizer.encode_batch_fast + numpy", tps, anchor_tps["bf"], "M tok/s", None),
        info(WORKLOAD, "llmkit's whole command (start-up, loading) vs run_clm path", end_to_end, anchor_tps[run_clm],
             "M tok/s"),
        at_most(WORKLOAD, f"peak RSS: corpus x{large} vs x{repeat} ({large // repeat}x the text)", big["max_rss_mb"],
                rss, "MB", MEMORY_GOAL),
        close(WORKLOAD, "equal work: tokens produced (vs b)", llmkits[0]["tokens"], anchors[0]["b"]["tokens"], "M",
              TOKENS_TOLERANCE, note="llmkit: no newline tokens, an end-of-text token per line; another BPE"),
    ]
    figures = {"corpus_repeat": repeat, "llmkit": {"tokens_per_s": tps, "rounds": llmkits, "large_corpus": big,
                                                   "end_to_end_tokens_per_s": end_to_end, "max_rss_mb": rss},
               "anchor": {"tokens_per_s": anchor_tps, "run_clm_variant": run_clm, "rounds": anchors}}
    return Outcome(rows, figures)
