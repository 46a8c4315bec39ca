"""Multi-process and multi-machine runs: llmkit re-launches itself through accelerate's own launcher.

`llmkit pretrain ... --num-processes 4` becomes `python -m accelerate.commands.launch --num_processes 4 ...
-m llmkit pretrain ...` (an argument list, never a shell string), and the launched processes run the same
command as ranks of one job. Runs started by `accelerate launch -m llmkit` or `torchrun -m llmkit` are
recognised and not launched again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from llmkit.errors import UsageError

LAUNCHED = "LLMKIT_LAUNCHED"


def is_main_process() -> bool:
    """Rank 0 of a launched job, or a process that was not launched at all (before any process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def already_launched() -> bool:
    return bool(os.environ.get(LAUNCHED)) or "LOCAL_RANK" in os.environ or "RANK" in os.environ and \
        "WORLD_SIZE" in os.environ


def launch_command(cfg: Any, argv: list[str]) -> list[str]:
    import torch

    processes = cfg.num_processes or 1
    machines = getattr(cfg, "num_machines", 1)
    if machines > 1 and getattr(cfg, "main_process_ip", None) is None:
        raise UsageError("--num-machines above 1 needs --main-process-ip (the address of the rank-0 machine)")
    if machines > 1 and processes % machines:
        raise UsageError(f"--num-processes {processes} counts the processes of all machines: make it a multiple "
                         f"of --num-machines {machines}")
    if getattr(cfg, "machine_rank", 0) >= machines:
        raise UsageError(f"--machine-rank {cfg.machine_rank} must be below --num-machines {machines}")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.num_processes or not cfg.accelerate_config:  # else the config file's own number counts
        command += ["--num_processes", str(processes)]
    if machines > 1 or not cfg.accelerate_config:
        command += ["--num_machines", str(machines)]
    if machines > 1:
        command += ["--machine_rank", str(cfg.machine_rank), "--main_process_ip", cfg.main_process_ip]
    if getattr(cfg, "main_process_port", None):
        command += ["--main_process_port", str(cfg.main_process_port)]
    if cfg.accelerate_config:
        if not os.path.isfile(cfg.accelerate_config):
            raise UsageError(f"--accelerate-config {cfg.accelerate_config} does not exist: check the path "
                             "(ready-made ones are in recipes/accelerate/)")
        command += ["--config_file", cfg.accelerate_config]
    elif processes > 1 or machines > 1:
        # accelerate's torchrun-based launcher; without CUDA, llmkit's processes join a gloo group (multi-CPU)
        command += ["--multi_gpu"]
        if not torch.cuda.is_available():
            command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) * machines // processes))]
    command += ["--dynamo_backend", "no", "-m", "llmkit", *argv]
    return command


def relaunch_if_needed(cfg: Any) -> bool:
    """Run the command under accelerate's launcher when more than one process is asked for; True if it ran."""
    wants = (cfg.num_processes or 1) > 1 or getattr(cfg, "num_machines", 1) > 1 or cfg.accelerate_config
    if not wants or already_launched():
        return False
    command = launch_command(cfg, sys.argv[1:])
    env = {**os.environ, LAUNCHED: "1"}
    result = subprocess.run(command, env=env)
    if result.returncode:
        sys.exit(result.returncode)
    return True
