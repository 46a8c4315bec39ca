"""Crash-safe checkpoints: written to a temporary sibling, fsynced, renamed; verified before they are trusted.

A checkpoint directory holds the model weights (safetensors), the optimizer and scheduler state, the fp16
gradient scaler's state (when there is one), every RNG state (one file per process) and `trainer_state.json`
(step, data position, best metric), plus a `manifest.json` with the size and SHA-256 of every file.
`--resume auto` takes the newest checkpoint whose manifest checks out, so a checkpoint cut short by a kill is
never picked, and what a crash leaves between two renames is put right at the next start (`recover`). Training
state is read with `torch.load(weights_only=True)`: no pickle from disk is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from llmkit.errors import LlmkitError, UsageError

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
SCALER = "scaler.pt"
STEP_NAME = re.compile(r"step-\d+")
T = TypeVar("T")
R = TypeVar("R")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: Path, files: bool = True) -> None:
    """fsync every file and directory under `directory` (itself included): its contents and their names are on
    the disk before a rename makes them visible. files=False: the manifest and the directories only (the other
    files were fsynced as they were hashed)."""
    for path in sorted(directory.rglob("*"), reverse=True):  # deepest first: a directory after its entries
        if files or path.is_dir() or path.name == MANIFEST:
            fsync(path)
    fsync(directory)


def _each_file(work: Callable[[T], R], items: list[T]) -> list[R]:
    """work(item) for every item (a file, or a file with its manifest entry), side by side in threads: hashlib and
    file I/O release the GIL, so a checkpoint's few large files take as long as the largest, not their sum."""
    if len(items) < 2:
        return [work(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(items), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(work, items))


def write_manifest(directory: Path, sync: bool = False) -> None:
    """manifest.json with every file's size and SHA-256; with `sync`, each file is also fsynced once hashed."""
    def entry(path: Path) -> dict[str, Any]:
        meta = {"size": path.stat().st_size, "sha256": _sha256(path)}
        if sync:
            fsync(path)
        return meta

    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    files = dict(zip((str(p.relative_to(directory)) for p in paths), _each_file(entry, paths)))
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify(directory: Path) -> bool:
    """Whether every file the manifest lists is there with its size and SHA-256. A manifest of the wrong shape, a
    missing file or a size that differs is False before any file is hashed."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(directory / name, meta["size"], meta["sha256"]) for name, meta in files.items()]
        if not all(path.is_file() and path.stat().st_size == size for path, size, _ in entries):
            return False
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return False

    def intact(entry: tuple[Path, int, str]) -> bool:
        path, _, digest = entry
        return _sha256(path) == digest

    try:
        return all(_each_file(intact, entries))
    except OSError:
        return False


def temporary_sibling(final: Path, create: bool = True) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    if create:
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True)
            fsync(final.parent.parent)  # the new directory's name is durable before anything is committed in it
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def _old_sibling(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def commit(tmp: Path, final: Path) -> None:
    """Add the manifest, fsync, and rename `tmp` over `final` (the old `final` goes only after the rename).
    A crash between the two renames leaves `.old-NAME` as the only committed copy: `recover` puts it back."""
    write_manifest(tmp, sync=True)  # the files' fsyncs overlap the hashing of the others
    sync_tree(tmp, files=False)
    old = _old_sibling(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """Tidy what a crash left around `final`: a `.old-` copy goes back into place when `final` is missing (the
    crash came between the two renames of `commit`: it is the only committed copy), and is redundant otherwise;
    a `.tmp-` directory is unfinished or superseded. Call it only while holding the run directory's lock."""
    old, tmp = _old_sibling(final), temporary_sibling(final, create=False)
    if old.is_dir() and not final.exists():
        os.replace(old, final)
        fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def recover_checkpoints(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for path in list(root.iterdir()):
        if path.name.startswith((".old-", ".tmp-")) and is_checkpoint_entry(path.name):
            recover(root / path.name[len(".old-"):])


def is_checkpoint_entry(name: str) -> bool:
    """Whether `name` is something llmkit writes under OUTPUT/checkpoints/: a checkpoint or its temporary copies."""
    return STEP_NAME.fullmatch(name.removeprefix(".old-").removeprefix(".tmp-")) is not None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))


def find_resume_checkpoint(resume: str, run_dir: Path, earlier_run: bool = False) -> Path:
    """The checkpoint to resume from: the newest verified one for `auto`, else the given directory, verified.
    `earlier_run`: run_dir holds a run (killed before its first checkpoint, say), which only --overwrite replaces."""
    if resume == "auto":
        for candidate in reversed(checkpoint_dirs(run_dir)):
            if verify(candidate):
                return candidate
        start = "start over with --overwrite instead" if earlier_run else "start without --resume"
        raise UsageError(f"--resume auto found no complete checkpoint in {run_dir / 'checkpoints'}: {start}, or pass "
                         "--resume PATH to a checkpoint")
    path = Path(resume).expanduser()
    if not (path / STATE).is_file():
        raise UsageError(f"--resume {resume} is not a checkpoint directory (no {STATE}): pass --resume auto or a "
                         "directory under OUTPUT/checkpoints/")
    if not verify(path):
        raise LlmkitError(f"checkpoint {path} is incomplete or corrupt (its files do not match manifest.json): "
                          "resume from an earlier one, or --resume auto")
    return path


def prune(run_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# What goes into a checkpoint


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk then raises OSError (ENOSPC), not an opaque RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_rng(directory: Path, rank: int) -> None:
    _torch_save(rng_state(), directory / f"rng-{rank}.pt")


def save_training_state(directory: Path, model, optimizer, scheduler, state: dict[str, Any], scaler=None) -> None:
    """`scaler`: fp16's GradScaler, if any; its loss scale took many steps to settle, so it is saved too."""
    from safetensors.torch import save_model

    save_model(model, str(directory / "model.safetensors"))
    _torch_save(optimizer.state_dict(), directory / "optimizer.pt")
    _torch_save(scheduler.state_dict(), directory / "scheduler.pt")
    if scaler is not None and scaler.is_enabled():
        _torch_save(scaler.state_dict(), directory / SCALER)
    (directory / STATE).write_text(json.dumps(state, indent=1))


def load_training_state(directory: Path, model, optimizer, scheduler, rank: int, model_signature: str,
                        scaler=None) -> dict:
    """Load a checkpoint into the given objects; a scaler missing on either side (a run resumed in another
    precision) starts afresh."""
    from safetensors.torch import load_model

    state = json.loads((directory / STATE).read_text())
    if state.get("model_signature") != model_signature:
        raise UsageError(f"checkpoint {directory} belongs to another model (different architecture or sizes): "
                         "resume with the settings of that run, or start a new --output")
    try:
        load_model(model, str(directory / "model.safetensors"))
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        if scaler is not None and (directory / SCALER).is_file():
            scaler.load_state_dict(torch.load(directory / SCALER, weights_only=True))
        rng_file = directory / f"rng-{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise LlmkitError(f"checkpoint {directory} could not be loaded ({str(e).splitlines()[0]}): resume from "
                          "another checkpoint") from None
    return state
