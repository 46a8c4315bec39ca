"""Reliability: a killed run resumes exactly; a damaged checkpoint is never resumed from; a crash between two
renames is repaired; a diverged run saves no diverged state; one run per output directory; and llmkit never
deletes or overwrites what it did not write."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_and_resume, read_metrics, tiny_pretrain
from safetensors.torch import load_file

from llmkit import checkpoint as ckpt
from llmkit.errors import UsageError
from llmkit.rundir import LOCK, RunDir


def _env() -> dict:
    """For llmkit subprocesses: offline, one thread each, and the session's cache (set by a fixture)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args):
    return [sys.executable, "-m", "llmkit", *args]


def _assert_same_weights(a, b, atol, note=""):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys(), note
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), f"{k} {note}"


def test_finetune_resume_after_sigkill_gives_the_same_weights(mlm_run, sst2, tmp_path):
    pretrained = tmp_path / "pretrained"
    shutil.copytree(mlm_run[0], pretrained, ignore=shutil.ignore_patterns("checkpoints", "best"))
    config = json.loads((pretrained / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # BERT's fine-tuning dropout
    (pretrained / "config.json").write_text(json.dumps(config))
    common = ["finetune", "--model", str(pretrained), "--data", str(sst2["train"]), "--max-samples", "320",
              "--global-batch-size", "16", "--max-steps", "30", "--save-every", "3", "--eval-every", "15",
              "--precision", "fp32", "--quiet", "--keep-checkpoints", "3", "--seed", "3"]
    subprocess.run(_cli(*common, "--output", str(tmp_path / "straight")), check=True, env=_env())
    interrupted = tmp_path / "interrupted"
    kills = kill_and_resume(_cli(*common), interrupted, _env())  # at moments drawn from a fixed seed
    assert kills >= 2, f"the run finished before it could be killed twice: {kills!r}"
    assert kills.during_save >= 1, f"no kill landed during a checkpoint write: {kills!r}"
    assert json.loads((interrupted / "llmkit_run.json").read_text())["status"] == "finished", repr(kills)
    _assert_same_weights(tmp_path / "straight", interrupted, atol=1e-6, note=repr(kills))
    _assert_same_weights(tmp_path / "straight" / "best", interrupted / "best", atol=1e-6, note=repr(kills))


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: --resume auto passes them by, --resume PATH refuses them


def _copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run (checkpoints step-30 and step-60) to damage."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)


def _damage(how: str, run: Path) -> Path:
    """Damage the run's checkpoints as a crash or a bad disk would; returns the checkpoint to resume from."""
    previous, newest = ckpt.checkpoint_dirs(run)[-2:]
    if how == "truncated-weights":
        _truncate(newest / "model.safetensors")
        return previous
    if how == "missing-manifest":
        (newest / ckpt.MANIFEST).unlink()
        return previous
    unfinished = newest.with_name(".tmp-step-00000090")  # a save cut short: some files, no manifest
    unfinished.mkdir()
    shutil.copy(newest / ckpt.STATE, unfinished / ckpt.STATE)
    shutil.copy(newest / "model.safetensors", unfinished / "model.safetensors")
    return newest


@pytest.mark.parametrize("how", ["truncated-weights", "missing-manifest", "leftover-tmp"])
def test_resume_auto_passes_a_damaged_checkpoint_by(how, clm_run, tmp_path):
    run = _copy_run(clm_run[0], tmp_path)
    expected = _damage(how, run)
    assert ckpt.find_resume_checkpoint("auto", run) == expected


@pytest.mark.parametrize("manifest", [
    "[]", '{"files": []}', '{"files": {"a.bin": []}}', '{"files": {"a.bin": {"size": 3}}}',
    '{"files": {"a.bin": {"size": 4, "sha256": "0"}}}', '{"files": {"b.bin": {"size": 3, "sha256": "0"}}}', "{",
])
def test_verify_is_false_for_a_manifest_of_any_wrong_shape(manifest, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    ckpt.write_manifest(tmp_path)
    assert ckpt.verify(tmp_path)
    (tmp_path / ckpt.MANIFEST).write_text(manifest)
    assert ckpt.verify(tmp_path) is False


def test_resume_auto_continues_from_the_last_good_checkpoint(clm_run, shakespeare, tokenizer_dir, tmp_path):
    run = _copy_run(clm_run[0], tmp_path)
    _damage("truncated-weights", run)
    _damage("leftover-tmp", run)
    tiny_pretrain("clm", shakespeare, run, tokenizer_dir, max_steps=60, eval_every=30, resume="auto")
    logged = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert logged == [10, 20, 30, 40, 50, 60]  # steps 40-60 again, from step 30, once each
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert all(ckpt.verify(c) for c in ckpt.checkpoint_dirs(run))
    assert json.loads((run / "llmkit_run.json").read_text())["status"] == "finished"
    _assert_same_weights(clm_run[0], run, atol=1e-5)  # as if never interrupted


def _pretrain_cli(shakespeare, tokenizer_dir, output, *flags):
    return _cli("pretrain", "--data", str(shakespeare), "--tokenizer", str(tokenizer_dir), "--model", "tiny",
                "--block-size", "64", "--global-batch-size", "16", "--precision", "fp32", "--quiet",
                "--output", str(output), *flags)


def _one_line_error(result, code: int) -> str:
    err = result.stderr
    assert result.returncode == code, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err  # one line (rich may wrap a very long one)
    return err


def test_resume_from_a_damaged_checkpoint_fails_in_one_line(clm_run, shakespeare, tokenizer_dir, tmp_path):
    run = _copy_run(clm_run[0], tmp_path)
    _damage("truncated-weights", run)
    newest = ckpt.checkpoint_dirs(run)[-1]
    result = subprocess.run(_pretrain_cli(shakespeare, tokenizer_dir, run, "--max-steps", "60", "--resume",
                                          str(newest)), capture_output=True, text=True, env=_env())
    err = _one_line_error(result, 1)
    assert f"checkpoint {newest} is incomplete or corrupt" in err


def test_a_crash_between_the_renames_of_a_commit_is_repaired(clm_run, tmp_path):
    run = _copy_run(clm_run[0], tmp_path)
    previous, newest = ckpt.checkpoint_dirs(run)
    # step-60 was being replaced: the old copy moved aside, the new one complete but not yet renamed
    newest.rename(newest.with_name(".old-" + newest.name))
    shutil.copytree(newest.with_name(".old-" + newest.name), newest.with_name(".tmp-" + newest.name))
    # step-30 was replaced all but the removal of its old copy
    shutil.copytree(previous, previous.with_name(".old-" + previous.name))
    (run / "best").rename(run / ".old-best")  # best/ likewise, with an unfinished new one
    (run / ".tmp-best").mkdir()
    (run / ".tmp-final").mkdir()  # the final export cut short
    (run / ".tmp-final" / "config.json").write_text("{}")
    claimed = RunDir(run)
    claimed.claim()
    claimed.release()
    assert ckpt.checkpoint_dirs(run) == [previous, newest]
    assert all(ckpt.verify(d) for d in (previous, newest, run / "best"))
    leftovers = [*run.glob(".tmp-*"), *run.glob(".old-*"), *run.glob("checkpoints/.*")]
    assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------------------------
# A diverged run stops before it saves


# --learning-rate 30 sends the tiny model's weights to nan/inf after a few steps. Saving every step, the weights check
# before a save catches it; saving every 4 steps, the loss of the step after shows it first, between saves and logs.
@pytest.mark.parametrize("save_every", ["1", "4"])
def test_a_diverged_run_saves_no_diverged_state(save_every, shakespeare, tokenizer_dir, tmp_path):
    out = tmp_path / "diverged"
    result = subprocess.run(_pretrain_cli(shakespeare, tokenizer_dir, out, "--learning-rate", "30", "--max-steps",
                                          "100", "--save-every", save_every, "--log-every", "50", "--keep-checkpoints",
                                          "100", "--eval-every", "1000"), capture_output=True, text=True, env=_env())
    err = _one_line_error(result, 1)
    found = re.search(r"the (loss|weights) became nan or inf (at|by) step (\d+)", err)
    assert found, err
    assert found[1] == ("weights" if save_every == "1" else "loss"), err
    assert "lower --learning-rate" in err and "--precision fp32" in err
    saved = ckpt.checkpoint_dirs(out)
    assert saved, "the run diverged before its first checkpoint: nothing was tested"
    assert all(int(c.name[5:]) < int(found[3]) for c in saved)  # nothing saved from the step it names on
    for checkpoint in saved:
        assert ckpt.verify(checkpoint), checkpoint
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint
        moments = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"].values()
        assert all(torch.isfinite(t).all() for m in moments for t in m.values()), checkpoint


# ---------------------------------------------------------------------------------------------------------------
# fp16's gradient scaler is part of the training state


def _fit_objects():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_the_gradient_scaler_is_saved_and_restored(tmp_path):
    model, optimizer, scheduler = _fit_objects()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    for overflow in (True, False, False):  # a skipped step halves the scale; good steps count toward growth
        loss = model(torch.ones(1, 4)).sum() * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**9 and saved["_growth_tracker"] == 2
    checkpoint = tmp_path / "step-3"
    tmp = ckpt.temporary_sibling(checkpoint)
    ckpt.save_training_state(tmp, model, optimizer, scheduler, {"step": 3, "model_signature": "s"}, scaler=scaler)
    ckpt.commit(tmp, checkpoint)
    assert ckpt.SCALER in json.loads((checkpoint / ckpt.MANIFEST).read_text())["files"]

    restored = torch.amp.GradScaler("cpu")
    ckpt.load_training_state(checkpoint, *_fit_objects(), rank=0, model_signature="s", scaler=restored)
    assert restored.state_dict() == saved
    assert restored.scale(torch.tensor(1.0)).item() == 2.0**9  # the next step runs at the saved scale

    without = tmp_path / "no-scaler"
    without.mkdir()
    ckpt.save_training_state(without, *_fit_objects(), {"step": 0}, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert not (without / ckpt.SCALER).exists()  # fp32 and bf16 runs have nothing to save


# ---------------------------------------------------------------------------------------------------------------
# One run per output directory, and nothing deleted or overwritten that llmkit did not write


def test_a_second_run_on_the_same_output_is_refused_naming_the_lock(shakespeare, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    command = _pretrain_cli(shakespeare, tokenizer_dir, out, "--max-steps", "100000", "--save-every", "3",
                            "--eval-every", "100000")
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not (out / "llmkit_run.json").is_file() and time.time() < deadline:  # written once the lock is held
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, env=_env())
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=120)
    err = _one_line_error(second, 2)
    assert str(out / LOCK) in err and "another llmkit run" in err
    assert first.returncode == 130, first_err  # the first run went on undisturbed, and stopped cleanly
    assert all(ckpt.verify(c) for c in ckpt.checkpoint_dirs(out))


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_llmkit_did_not_write_is_refused(overwrite, shakespeare, tokenizer_dir, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my project\n")
    (out / "config.json").write_text("{}\n")
    with pytest.raises(UsageError, match="holds files llmkit did not write .* choose an empty or new directory"):
        tiny_pretrain("clm", shakespeare, out, tokenizer_dir, max_steps=2, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]  # not even a lock file
    assert (out / "README.md").read_text() == "my project\n"


def test_overwrite_removes_only_what_llmkit_wrote(clm_run, shakespeare, tokenizer_dir, tmp_path):
    run = _copy_run(clm_run[0], tmp_path)
    (run / "notes.txt").write_text("mine\n")
    tiny_pretrain("clm", shakespeare, run, tokenizer_dir, max_steps=2, eval_every=100, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine\n"
    assert not ckpt.checkpoint_dirs(run)  # the old run's checkpoints went; this run saved none
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [2]
    assert json.loads((run / "llmkit_run.json").read_text())["step"] == 2


def test_tokenize_replaces_only_its_own_output(shakespeare, tokenizer_dir, tmp_path):
    from llmkit.api import tokenize
    from llmkit.config import TokenizeConfig

    out = tmp_path / "tok"
    (out / "data").mkdir(parents=True)
    (out / "data" / "mine.txt").write_text("mine\n")

    def run(max_samples):
        return tokenize(TokenizeConfig(data=[str(shakespeare)], output=str(out), tokenizer=str(tokenizer_dir),
                                       max_samples=max_samples, quiet=True))

    with pytest.raises(UsageError, match=f"{out / 'data'} exists and is not an `llmkit tokenize` output"):
        run(100)
    assert (out / "data" / "mine.txt").read_text() == "mine\n"
    (out / "data" / "mine.txt").unlink()
    fewer = run(100)  # an empty directory makes way
    more = run(200)  # and so does an earlier output of other inputs
    assert more["documents"] > fewer["documents"]


def test_resume_auto_without_a_checkpoint_in_an_earlier_run_points_to_overwrite(shakespeare, tokenizer_dir,
                                                                                  tmp_path):
    """A run that wrote no checkpoint (killed early, or one too short to save) cannot be resumed: the error says
    to start over with --overwrite, which that output needs, not merely to drop --resume."""
    from llmkit.errors import UsageError

    out = tmp_path / "run"
    tiny_pretrain("clm", shakespeare, out, tokenizer_dir, max_steps=2, save_every=100, eval_every=100)
    assert not ckpt.checkpoint_dirs(out)
    with pytest.raises(UsageError, match="found no complete checkpoint .*: start over with --overwrite instead"):
        tiny_pretrain("clm", shakespeare, out, tokenizer_dir, max_steps=4, save_every=100, resume="auto")
    with pytest.raises(UsageError, match="holds a finished run: pass --overwrite to start afresh, or"):
        tiny_pretrain("clm", shakespeare, out, tokenizer_dir, max_steps=4)
