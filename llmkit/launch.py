"""Multi-process and multi-machine runs: llmkit re-launches itself through accelerate's own launcher.

`llmkit pretrain ... --num-processes 4` becomes `python -m llmkit.launch --num_processes 4 ... -m llmkit
pretrain ...` (an argument list, never a shell string): accelerate's launcher, run by `launcher_main` below,
starts the same command as the ranks of one job. Runs started by `accelerate launch -m llmkit` or
`torchrun -m llmkit` are recognised and not launched again.

A launched job ends like a single-process run: a rank that fails hands its error line and exit status to the
launching llmkit process (`hand_over_error`), which prints the line once for the whole job and exits with that
status. SIGINT and SIGTERM sent to the llmkit process are passed to the launcher, whose agent sends them on to
the ranks (started in sessions of their own, they get no signal from the terminal): they finish the step, save
a checkpoint and stop with the resume message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError, UsageError

LAUNCHED = "LLMKIT_LAUNCHED"
ERROR_FILE = "LLMKIT_ERROR_FILE"  # where the first rank to fail writes {"code": ..., "message": ...}
LAUNCHER_LOG = "LLMKIT_LAUNCHER_LOG"  # where the launcher process writes its own stderr


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
    command = [sys.executable, "-m", "llmkit.launch"]
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


def needs_launch(cfg: Any) -> bool:
    """More than one process is asked for, and this is not yet one of them."""
    wants = (cfg.num_processes or 1) > 1 or getattr(cfg, "num_machines", 1) > 1 or cfg.accelerate_config
    return bool(wants) and not already_launched()


def relaunch(cfg: Any, argv: list[str], debug: bool = False) -> None:
    """Run the command (`argv`, as given to `llmkit.cli.main`) as a job under accelerate's launcher. A failed job
    raises the error of its first failed rank, with that rank's exit status."""
    import torch

    command = launch_command(cfg, argv)
    with tempfile.TemporaryDirectory(prefix="llmkit-launch-") as tmp:
        error_file, log = Path(tmp) / "error.json", Path(tmp) / "launcher.log"
        env = {**os.environ, LAUNCHED: "1", ERROR_FILE: str(error_file), LAUNCHER_LOG: str(log)}
        # After a signal the agent waits this long for the ranks to finish their step and save a checkpoint
        # before it kills them; torch's 30 s is too short for saving a large model.
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
        if not torch.cuda.is_available():  # one measurement for all ranks: they pick the same --precision auto
            from llmkit.train import BF16_SPEEDUP_ENV, cpu_bf16_speedup

            env[BF16_SPEEDUP_ENV] = str(cpu_bf16_speedup())
        status, signals = _run_forwarding_signals(command, env)
        error = _read_error(error_file)
        crashed = status != 0 and error is None and not signals  # no llmkit error to show: accelerate's report says why
        if (debug or crashed) and log.is_file():
            sys.stderr.write(log.read_text(errors="replace"))
    if status == 0:
        return
    if error is not None:
        raise _job_error(error["message"], error["code"])
    if signals:
        raise _job_error(f"stopped by {signals[0]}", 130)
    raise LlmkitError(f"a process of the job failed (exit status {status}), see accelerate's report above")


def _run_forwarding_signals(command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run the launcher in a session of its own and pass it the SIGINT and SIGTERM this process receives, so that
    a Ctrl-C reaches it exactly once (twice would make the ranks stop at once, without a checkpoint); returns its
    exit status and the names of the signals passed on."""
    launcher: subprocess.Popen | None = None
    received: list[str] = []
    early: list[int] = []  # signals that came before the launcher existed

    def forward(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        if launcher is None:
            early.append(signum)
        else:
            launcher.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher = subprocess.Popen(command, env=env, start_new_session=True)
        for signum in early:
            launcher.send_signal(signum)
        return launcher.wait(), received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _read_error(path: Path) -> dict[str, Any] | None:
    try:
        error = json.loads(path.read_text())
    except (OSError, ValueError):  # no rank failed with an llmkit error, or one was killed while writing it
        return None
    return error if isinstance(error, dict) and {"code", "message"} <= error.keys() else None


def _job_error(message: str, code: int) -> LlmkitError:
    error = LlmkitError(message)
    error.exit_code = code
    return error


def hand_over_error(message: str, code: int) -> bool:
    """In a rank of a job launched by `relaunch`: hand the error line and exit status to the launching
    process, which prints it once for the job; True if handed over (the rank then prints nothing). The first rank
    to fail wins: the others usually fail because of it (a peer gone, the agent's SIGTERM)."""
    path = os.environ.get(ERROR_FILE)
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another rank failed first: its error is the one shown
        return True
    except OSError:  # the launching process is gone: say it here
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"code": code, "message": message}, f)
    return True


def launcher_main() -> None:
    """The launcher process: accelerate's launcher with its own stderr (its warnings, torch's report and
    traceback of a failed rank) kept in a file, which the llmkit process shows only with --debug or after a crash.
    Only Python's sys.stderr is replaced: the ranks inherit the real stderr (file descriptor 2), so their output,
    the live progress display included, reaches the user as in a single-process run."""
    sys.stderr = open(os.environ[LAUNCHER_LOG], "w", buffering=1)
    sys.argv = ["accelerate launch", *sys.argv[1:]]
    from accelerate.commands.launch import main

    main()


if __name__ == "__main__":
    launcher_main()
