"""Fine-tuning survives being killed: SIGKILL at different moments, then --resume auto, ends with the weights of an
uninterrupted run - with dropout on, so the RNG state must come back exactly too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from conftest import kill_and_resume
from safetensors.torch import load_file


def _cli(*args):
    return [sys.executable, "-m", "llmkit", *args]


def _assert_same_weights(a, b, atol):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), k


def test_finetune_resume_after_sigkill_gives_the_same_weights(mlm_run, sst2, tmp_path):
    pretrained = tmp_path / "pretrained"
    shutil.copytree(mlm_run[0], pretrained, ignore=shutil.ignore_patterns("checkpoints", "best"))
    config = json.loads((pretrained / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # BERT's fine-tuning dropout
    (pretrained / "config.json").write_text(json.dumps(config))
    common = ["finetune", "--model", str(pretrained), "--data", str(sst2["train"]), "--max-samples", "320",
              "--global-batch-size", "16", "--max-steps", "30", "--save-every", "3", "--eval-every", "15",
              "--precision", "fp32", "--quiet", "--keep-checkpoints", "3", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*common, "--output", str(tmp_path / "straight")), check=True, env=env)
    interrupted = tmp_path / "interrupted"
    kills = kill_and_resume(_cli(*common), interrupted, env)
    assert kills >= 2, "the run finished before it could be killed twice"
    assert json.loads((interrupted / "llmkit_run.json").read_text())["status"] == "finished"
    _assert_same_weights(tmp_path / "straight", interrupted, atol=1e-6)
    _assert_same_weights(tmp_path / "straight" / "best", interrupted / "best", atol=1e-6)
