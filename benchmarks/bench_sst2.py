"""The real-data check: one full epoch of all-MiniLM-L6-v2 on SST-2 with llmkit's defaults, scored on GLUE's dev set.

The command is the README's (`llmkit finetune --recipe recipes/sst2-minilm.yaml`), with evaluation only at the end
so that the wall time is the training's. Reports test accuracy (goal: >= 88 %), wall time and samples/s. There is
no anchor run here: the throughput comparison with the Trainer is the `finetune` benchmark's; this one shows that
the defaults give a good model on the whole data set. --quick trains on 2,000 rows (accuracy then means little).
"""

from __future__ import annotations

from harness import LLMKIT, MINILM, Bench, Outcome, info, threshold, training_figures

WORKLOAD = "SST-2 full epoch (real-data check)"
GOAL_ACCURACY = 0.88


def default_rounds(quick: bool) -> int:
    return 1


def run(bench: Bench) -> Outcome:
    output = bench.work / "sst2-full"
    command = [*LLMKIT, "finetune", "--recipe", "recipes/sst2-minilm.yaml", "--model", MINILM, "--output", output,
               "--eval-every", 100_000, "--save-every", 100_000, "--log-every", 50, "--quiet"]
    if bench.quick:
        command += ["--max-samples", 2000]
    done = bench.run("llmkit finetune (recipe)", command)
    figures = training_figures(output, "samples_per_second")
    accuracy = figures["eval"]["eval_accuracy"]
    rows = [threshold(WORKLOAD, f"test.tsv accuracy after {figures['plan']['steps']:,} steps", accuracy, "%",
                      GOAL_ACCURACY, note="GLUE dev, 872 rows"),
            info(WORKLOAD, "wall time, start to saved model", done.seconds, None, "s"),
            info(WORKLOAD, "training throughput", figures["rate"], None, "samples/s")]
    return Outcome(rows, {"accuracy": accuracy, "seconds": done.seconds, "samples_per_s": figures["rate"],
                          "steps": figures["plan"]["steps"], "command": " ".join(map(str, command))})
