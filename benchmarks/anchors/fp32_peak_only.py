"""Run a shared anchor script as it is, except that its bf16 GEMM peak is timed on one product instead of dozens.

For CPUs without bf16 instructions (AVX-512 BF16 or AMX), where bf16 products run emulated: there one 1024^3 bf16
product takes ~3 s, and anchor_mlm.py's peak measurement (35 products before its runs and 35 after) would add 3.5
minutes to every round, for a bf16 figure that no comparison uses (the bf16 runs are not made on such a CPU). The
anchor's training, timing and fp32 peak are untouched: its main() runs with its own arguments.

Usage (from the project root): python benchmarks/anchors/fp32_peak_only.py ANCHOR.py [ANCHOR'S ARGUMENTS...]
"""
import runpy
import sys
import time

import torch

script, sys.argv = sys.argv[1], sys.argv[1:]
anchor = runpy.run_path(script, run_name="anchor")  # defines its functions; `if __name__ == "__main__"` stays off
main = anchor["main"]
measured = main.__globals__["matmul_peak"]  # the dictionary main() looks names up in (run_path returns a copy)


def matmul_peak(dtype, n=1024, **options):
    if dtype != torch.bfloat16:
        return measured(dtype, n, **options)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    start = time.perf_counter()
    a @ b
    gflops = 2 * n ** 3 / (time.perf_counter() - start) / 1e9
    return gflops, gflops  # (median, best), as the anchor's helper returns them


main.__globals__["matmul_peak"] = matmul_peak
main()
