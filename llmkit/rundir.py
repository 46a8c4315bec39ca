"""The run directory: one run at a time (a lock), metrics.jsonl, and the exported model directories.

    OUTPUT/
      config.json, model.safetensors, tokenizer files, generation_config.json, README.md   <- final model
      llmkit_run.json        merged settings, metrics, library versions, status
      metrics.jsonl          one JSON object per log line and evaluation
      best/                  the best model by the run's metric (a model directory as well)
      checkpoints/step-N/    resumable training state

A finished run is never overwritten without --overwrite, and --overwrite removes only what llmkit wrote. A
directory llmkit did not write (no record, no lock) is refused: the final model would land among its files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llmkit import checkpoint as ckpt
from llmkit.errors import UsageError

RECORD = "llmkit_run.json"
LOCK = ".llmkit.lock"  # created by the first run in a directory and kept: it also says "llmkit was here"
# What a run writes besides the final model (whose files the record lists): what --overwrite removes.
OWNED = ("checkpoints", "best", "metrics.jsonl", "curves.png", "tensorboard", RECORD)
FINAL_TMP = ".tmp-final"
SHARED_MARKER = ".llmkit-shared-"  # train.writes_output's probe for a shared file system; a crash may leave one


def _save_model(model, directory: Path) -> None:
    """save_pretrained, also on the local main process of a machine that does not share the output directory
    (transformers writes only on global rank 0 once torch.distributed is initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        model.save_pretrained(directory)
        return
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(directory)
    finally:
        del model.should_save_on_this_rank


def _written_by_llmkit(path: Path) -> bool:
    """What llmkit may find in a directory without its record or lock: checkpoints, and a stray probe marker."""
    if path.name.startswith(SHARED_MARKER):
        return True
    return path.name == "checkpoints" and path.is_dir() and all(ckpt.is_checkpoint_entry(p.name)
                                                                 for p in path.iterdir())


class RunDir:
    def __init__(self, path: Path, main: bool = True):
        self.path = path
        self.main = main
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Make an existing --output this run's before anything is read from it: refuse a directory llmkit did not
        write, take the lock, and repair what a crash between two renames left. A new directory is claimed by
        `start`, so that a command failing before then leaves nothing behind."""
        if not self.main or self._lock_fd is not None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--output {self.path} is a file: give a directory")
        if not self.path.exists():
            return
        self._refuse_foreign()
        self._lock()
        ckpt.recover_checkpoints(self.path)
        ckpt.recover(self.path / "best")
        shutil.rmtree(self.path / FINAL_TMP, ignore_errors=True)  # the final export starts again at the end

    def start(self, resume: bool, overwrite: bool, keep_metrics_until: int | None = None) -> None:
        if not self.main:
            return
        if self._lock_fd is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self.claim()
        record = self.read_record()
        if not resume:
            if record is not None and not overwrite:
                what = "a finished run" if record.get("status") == "finished" else "an unfinished run"
                resumable = record.get("status") != "finished" and ckpt.checkpoint_dirs(self.path)
                hint = " or --resume auto to continue it" if resumable else ""
                raise UsageError(f"--output {self.path} holds {what}: pass --overwrite to start afresh{hint}, or "
                                 "choose another --output")
            if record is None and ckpt.checkpoint_dirs(self.path) and not overwrite:
                raise UsageError(f"--output {self.path} holds checkpoints: pass --resume auto to continue, or "
                                 "--overwrite to start afresh")
            if overwrite:
                self._remove_owned(record)
        elif keep_metrics_until is not None:
            self._truncate_metrics(keep_metrics_until)
        self.write_record({"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _refuse_foreign(self) -> None:
        """Without llmkit's record or lock, a directory is llmkit's only if it holds nothing but checkpoints
        (copied in to resume from): anywhere else the final model would overwrite same-named files, and
        --overwrite could not tell theirs from ours."""
        if (self.path / RECORD).is_file() or (self.path / LOCK).is_file():
            return
        foreign = sorted(p.name for p in self.path.iterdir() if not _written_by_llmkit(p))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UsageError(f"--output {self.path} holds files llmkit did not write ({shown}): choose an empty or "
                             "new directory")

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.path / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another llmkit run is using {self.path} (it holds {self.path / LOCK}): wait for it "
                             "to finish, or choose another --output") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Let the next run in (a process that exits releases its lock too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_owned(self, record: dict | None) -> None:
        names = set(OWNED) | set((record or {}).get("files", []))
        for name in names:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def _truncate_metrics(self, step: int) -> None:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def read_record(self) -> dict | None:
        path = self.path / RECORD
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {"status": "unknown"}

    def write_record(self, update: dict[str, Any]) -> None:
        record = self.read_record() or {}
        record.update(update)
        tmp = self.path / f".{RECORD}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=2, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / RECORD)
        ckpt.fsync(self.path)

    def log(self, entry: dict[str, Any]) -> None:
        if not self.main:
            return
        entry = {"time": round(time.time(), 3), **entry}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def export(self, model, tokenizer, directory: Path, record: dict[str, Any], final: bool = False) -> None:
        """Write a plain Hugging Face model directory (plus llmkit's record and a model card), atomically:
        `best/` as one directory rename, the final model at the top of the run directory file by file."""
        from llmkit.card import model_card

        target = directory if not final else self.path / FINAL_TMP
        tmp = ckpt.temporary_sibling(target) if not final else target
        if final:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        full = {**(self.read_record() or {}), **record, "status": "finished" if final else "best"}
        try:
            _save_model(model, tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(model, full))
            if not final:
                (tmp / RECORD).write_text(json.dumps(full, indent=2, default=str))
                ckpt.commit(tmp, directory)
                return
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a disk that filled up leaves no half-written model
            raise
        files = sorted(set(full.get("files", [])) | {p.name for p in tmp.iterdir()})
        self.write_record({"files": files})  # claimed before they land: --overwrite removes a half-moved model too
        ckpt.sync_tree(tmp)
        for path in list(tmp.iterdir()):
            os.replace(path, self.path / path.name)
        ckpt.fsync(self.path)
        tmp.rmdir()
        self.write_record({**full, "files": files, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
