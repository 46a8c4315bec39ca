"""The command line, through typer's runner and through the installed `llmkit` entry point."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app

runner = CliRunner()
LLMKIT = shutil.which("llmkit", path=str(Path(sys.executable).parent)) or "llmkit"


def run(*args, **kwargs):
    return subprocess.run([LLMKIT, *args], capture_output=True, text=True, **kwargs)


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("tokenize", "pretrain", "finetune", "evaluate", "classify"):
        assert name in result.output


def test_print_config_merges_recipe_and_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 100\nlearning_rate: 3.0e-4\n")
    result = runner.invoke(app, ["pretrain", "--recipe", str(recipe), "--data", "x.txt", "--output", "o",
                                 "--max-steps", "5", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "max_steps: 5" in result.output and "learning_rate: 0.0003" in result.output


def test_entry_point_end_to_end(shakespeare, tmp_path):
    tok = tmp_path / "tok"
    r = run("tokenize", "--data", str(shakespeare), "--output", str(tok), "--vocab-size", "800", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["vocab_size"] == 800 and summary["tokens"] > 10_000
    r = run("pretrain", "--data", str(tok), "--output", str(tmp_path / "lm"), "--model", "tiny", "--max-steps",
            "12", "--block-size", "64")
    assert r.returncode == 0, r.stderr
    r = run("evaluate", "--model", str(tmp_path / "lm"), "--data", str(shakespeare), "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert {"loss", "perplexity"} <= set(metrics)
    r = run("pretrain", "--data", str(tok), "--output", str(tmp_path / "lm"), "--model", "tiny", "--max-steps", "12")
    assert r.returncode == 2 and "holds a finished run" in r.stderr and "--overwrite" in r.stderr


@pytest.mark.parametrize("args, exit_code, message", [
    (["pretrain", "--data", "missing.txt", "--output", "o"], 2, "missing.txt does not exist"),
    (["pretrain", "--data", "x.txt", "--output", "o", "--learning-rate", "-1"], 2, "--learning-rate must be greater"),
    (["pretrain", "--data", "x.txt", "--output", "o", "--objective", "gpt"], 2, "--objective must be one of"),
    (["pretrain", "--data", "x.txt", "--outptu", "o"], 2, "No such option"),
    (["finetune", "--data", "x.tsv", "--output", "o"], 2, "--model is required"),
    (["classify", "hello", "--model", "/nonexistent/model"], 1, "does not exist"),
])
def test_bad_input_is_one_line_without_traceback(args, exit_code, message, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == exit_code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # one line (rich may wrap a very long one)
    assert not (tmp_path / "o").exists()
