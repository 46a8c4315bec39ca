"""Data parallelism through accelerate's launcher, with real processes (gloo on this CPU-only machine)."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LLMKIT = shutil.which("llmkit", path=str(Path(sys.executable).parent)) or "llmkit"
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain_args(tok, out, *extra, steps=8):
    return ["pretrain", "--data", str(tok / "data"), "--tokenizer", str(tok), "--output", str(out), "--model", "tiny",
            "--block-size", "64", "--global-batch-size", "16", "--max-steps", str(steps), "--precision", "fp32",
            "--quiet", *extra]


def _pretrain(tok, out, *extra):
    return subprocess.run([LLMKIT, *_pretrain_args(tok, out, "--eval-every", "4", *extra)], capture_output=True,
                          text=True, timeout=600)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_processes_match_one_process(tokenizer_dir, tmp_path):
    # Gradients summed in another order differ by rounding; Adam turns that into updates of up to the learning
    # rate for parameters whose gradient is ~0, so a modest learning rate keeps the comparison tight.
    one = _pretrain(tokenizer_dir, tmp_path / "one", "--learning-rate", "3e-4")
    assert one.returncode == 0, one.stderr
    two = _pretrain(tokenizer_dir, tmp_path / "two", "--num-processes", "2", "--learning-rate", "3e-4")
    assert two.returncode == 0, two.stderr
    record = json.loads((tmp_path / "two" / "llmkit_run.json").read_text())
    assert record["plan"]["processes"] == 2 and record["plan"]["global_batch"] == 16
    assert len(set(record["weights_sha256_by_rank"])) == 1 and len(record["weights_sha256_by_rank"]) == 2
    assert _max_difference(tmp_path / "one", tmp_path / "two") < 1e-5


def test_two_machines_on_loopback(tokenizer_dir, tmp_path):
    port = str(_free_port())
    common = ["--num-processes", "2", "--num-machines", "2", "--main-process-ip", "127.0.0.1",
              "--main-process-port", port]
    args = lambda out, rank: [LLMKIT, "pretrain", "--data", str(tokenizer_dir / "data"), "--tokenizer",
                              str(tokenizer_dir), "--output", str(out), "--model", "tiny", "--block-size", "64",
                              "--global-batch-size", "16", "--max-steps", "6", "--precision", "fp32", "--quiet",
                              "--machine-rank", str(rank), *common]
    first = subprocess.Popen(args(tmp_path / "m0", 0), stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args(tmp_path / "m1", 1), stderr=subprocess.PIPE, text=True)
    _, err1 = second.communicate(timeout=600)
    _, err0 = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, err0 + err1
    record = json.loads((tmp_path / "m0" / "llmkit_run.json").read_text())
    assert len(record["weights_sha256_by_rank"]) == 2 and len(set(record["weights_sha256_by_rank"])) == 1
    # The two "machines" do not share --output: each wrote its own copy of the final model.
    assert _max_difference(tmp_path / "m0", tmp_path / "m1") == 0.0


def test_evaluation_under_two_processes_matches_one(clm_run, minilm, sst2, tmp_path):
    run, _ = clm_run
    lm = lambda *extra: subprocess.run([LLMKIT, "evaluate", "--model", str(run), "--eval-data",
                                        str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"),
                                        "--max-samples", "301", "--json", "--precision", "fp32", *extra],
                                       capture_output=True, text=True, timeout=600)
    one, two = lm(), lm("--num-processes", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # one JSON object: only rank 0 prints
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # batches differ

    from llmkit.api import finetune
    from llmkit.config import FinetuneConfig, build_config

    classifier = tmp_path / "cls"
    finetune(build_config(FinetuneConfig, flags=dict(model=str(minilm), data=[str(sst2["train"])], max_steps=4,
                                                     output=str(classifier), quiet=True, validation_split=0.0)))
    cls = lambda *extra: subprocess.run([LLMKIT, "evaluate", "--model", str(classifier), "--eval-data",
                                         str(sst2["test"]), "--json", "--precision", "fp32", *extra],
                                        capture_output=True, text=True, timeout=600)
    one, two = cls(), cls("--num-processes", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["examples"] == b["examples"] == 300  # 300 rows over 2 processes: none dropped, none counted twice
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["accuracy"] == b["accuracy"]


def test_resuming_with_another_number_of_processes_is_refused(tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    first = _pretrain(tokenizer_dir, out, "--save-every", "4")
    assert first.returncode == 0, first.stderr
    (out / "llmkit_run.json").unlink()  # pretend it was interrupted
    again = _pretrain(tokenizer_dir, out, "--resume", "auto", "--num-processes", "2")
    assert again.returncode == 2, again.stderr  # a usage error, as in one process
    [line] = _error_lines(again.stderr)  # once for the job, not once per rank
    assert "was written by a run with 1 processes" in line and "Traceback" not in again.stderr


def test_usage_error_in_the_ranks_through_the_python_entry_point(tokenizer_dir, tmp_path):
    # main(argv) must launch the ranks with argv, not with this process's sys.argv (here just ["-c"]).
    args = _pretrain_args(tokenizer_dir, tmp_path / "run", "--num-processes", "2", "--micro-batch-size", "3")
    r = subprocess.run([sys.executable, "-c", f"from llmkit.cli import main; main({args!r})"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert _error_lines(r.stderr) == ["error: --micro-batch-size 3 does not divide the 8 examples each process takes "
                                      "per step (global batch 16 / 2 processes): pick a divisor"], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_sigterm_stops_two_processes_with_a_checkpoint_and_resume_finishes(tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    command = [LLMKIT, *_pretrain_args(tokenizer_dir, out, "--num-processes", "2", "--log-every", "1", steps=60)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the ranks are training once they log their first step
    job.send_signal(signal.SIGTERM)  # to the llmkit process only, as a scheduler or `kill` would
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 130, stderr
    [line] = _error_lines(stderr)
    assert line.startswith("error: stopped by SIGTERM at step ") and "--resume auto" in line
    assert "Traceback" not in stderr and stderr.count("--resume auto") == 1
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert saved and not (out / "model.safetensors").exists()

    resumed = subprocess.run([*command, "--resume", "auto"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((out / "llmkit_run.json").read_text())
    assert record["step"] == 60 and len(set(record["weights_sha256_by_rank"])) == 1


def test_every_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    kinds = {load_config_from_file(str(p)).distributed_type.value for p in configs}
    assert {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU"} <= kinds


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@gpu
@pytest.mark.gpu
def test_gpu_bf16_autocast(tokenizer_dir, tmp_path):
    r = _pretrain(tokenizer_dir, tmp_path / "gpu", "--precision", "bf16")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "gpu" / "llmkit_run.json").read_text())["plan"]["precision"] == "bf16"


@two_gpus
@pytest.mark.gpu
def test_nccl_two_gpus_match_one(tokenizer_dir, tmp_path):
    one = _pretrain(tokenizer_dir, tmp_path / "one")
    two = _pretrain(tokenizer_dir, tmp_path / "two", "--num-processes", "2", "--accelerate-config",
                    str(ROOT / "recipes" / "accelerate" / "multi-gpu.yaml"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert _max_difference(tmp_path / "one", tmp_path / "two") < 1e-4  # TF32/cuBLAS reductions differ slightly


@two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed-zero2.yaml"])
def test_sharded_configs_train(config, tokenizer_dir, tmp_path):
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    r = _pretrain(tokenizer_dir, tmp_path / "run", "--num-processes", "2", "--accelerate-config",
                  str(ROOT / "recipes" / "accelerate" / config))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
