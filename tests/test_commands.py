"""generate, fill, env, recipes and plot: through the Python API on the tiny session models, and each once through
the installed `llmkit` entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_metrics
from llmkit.api import env, fill, generate, plot, recipes
from llmkit.config import EnvConfig, FillConfig, GenerateConfig, PlotConfig, RecipesConfig, build_config
from llmkit.errors import LlmkitError, UsageError

LLMKIT = shutil.which("llmkit", path=str(Path(sys.executable).parent)) or "llmkit"


def run(*args, **kwargs):
    return subprocess.run([LLMKIT, *args], capture_output=True, text=True, **kwargs)


def _generate(model, *prompts, **flags):
    return generate(build_config(GenerateConfig, flags={"prompts": list(prompts), "model": str(model), "quiet": True,
                                                        **flags}))


# ---------------------------------------------------------------------------------------------------------------
# generate


def test_generate_same_seed_same_text(clm_run):
    run_dir, _ = clm_run
    first = _generate(run_dir, "ROMEO:", "", max_new_tokens=12, seed=7, num_return_sequences=2)
    again = _generate(run_dir, "ROMEO:", max_new_tokens=12, seed=7, num_return_sequences=2)
    other = _generate(run_dir, "ROMEO:", max_new_tokens=12, seed=8, num_return_sequences=2)
    assert [r["prompt"] for r in first] == ["ROMEO:", ""]
    assert all(len(r["completions"]) == 2 and r["seed"] == 7 for r in first)
    assert all(c.strip() for r in first for c in r["completions"])  # an empty prompt still gets a text
    # a prompt's texts depend on the prompt, settings and seed only, not on the prompts before it
    assert again[0]["completions"] == first[0]["completions"]
    assert other[0]["completions"] != first[0]["completions"]
    unseeded = _generate(run_dir, "ROMEO:", max_new_tokens=4)
    assert isinstance(unseeded[0]["seed"], int)  # the fresh seed is reported so that the text can be reproduced
    assert _generate(run_dir, "ROMEO:", max_new_tokens=4, seed=unseeded[0]["seed"])[0]["completions"] == \
        unseeded[0]["completions"]


def test_greedy_generation_follows_the_model(clm_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = clm_run
    prompt = "First Citizen:\nBefore we proceed any further, hear me"
    short = _generate(run_dir, prompt, max_new_tokens=4, temperature=0)[0]["completions"][0]
    long = _generate(run_dir, prompt, max_new_tokens=12, temperature=0, seed=3)[0]["completions"][0]
    assert long.startswith(short) and len(long) > len(short)  # greedy: no randomness, a longer run extends it
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
    assert short.startswith(tokenizer.decode([int(logits.argmax())]))


def test_generate_long_prompt_keeps_its_end(clm_run):
    run_dir, _ = clm_run
    positions = json.loads((run_dir / "config.json").read_text())["n_positions"]
    result = _generate(run_dir, "to be or not to be " * positions, max_new_tokens=8, temperature=0)[0]
    assert result["truncated"] and result["completions"][0]
    with pytest.raises(UsageError, match=f"--max-new-tokens {positions - 1} or less"):
        _generate(run_dir, "hi", max_new_tokens=positions)


def test_generate_refuses_what_it_cannot_do(clm_run, mlm_run):
    with pytest.raises(LlmkitError, match="masked .* language model, not a causal .*llmkit fill"):
        _generate(mlm_run[0], "hello")
    with pytest.raises(UsageError, match="--num-return-sequences above 1 needs sampling"):
        _generate(clm_run[0], "hello", temperature=0, num_return_sequences=2)
    with pytest.raises(UsageError, match="--top-p must be between 0 and 1"):
        _generate(clm_run[0], "hello", top_p=1.5)


def test_generate_entry_point(clm_run):
    r = run("generate", "ROMEO:", "JULIET:", "--model", str(clm_run[0]), "--max-new-tokens", "6", "--seed", "5",
            "--num-return-sequences", "2")
    assert r.returncode == 0, r.stderr
    api = _generate(clm_run[0], "ROMEO:", "JULIET:", max_new_tokens=6, seed=5, num_return_sequences=2)
    texts = [x["prompt"] + c for x in api for c in x["completions"]]
    assert r.stdout == "\n\n".join(texts) + "\n"  # the command line and the API give the same texts


# ---------------------------------------------------------------------------------------------------------------
# fill


def _fill(model, *texts, **flags):
    return fill(build_config(FillConfig, flags={"texts": list(texts), "model": str(model), "quiet": True, **flags}))


def test_fill_ranks_the_model_predictions(mlm_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run_dir, _ = mlm_run
    placeholder, literal = _fill(run_dir, "The {mask} is bright.", "The [MASK] is bright.", top_k=4)
    assert placeholder["masks"] == literal["masks"]  # {mask} is the model's own mask token
    ranked = placeholder["masks"][0]
    assert len(ranked) == 4
    scores = [x["score"] for x in ranked]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] and sum(scores) <= 1
    assert placeholder["filled"] == f"The {ranked[0]['token']} is bright."
    # the scores are the model's own probabilities at the mask, special tokens left out of the ranking
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForMaskedLM.from_pretrained(run_dir).eval()
    ids = tokenizer("The [MASK] is bright.")["input_ids"]
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)].softmax(-1)
    probs[tokenizer.all_special_ids] = 0
    assert tokenizer.decode([int(probs.argmax())]).strip() == ranked[0]["token"]
    assert float(probs.max()) == pytest.approx(ranked[0]["score"], rel=1e-4)
    assert not {x["token"] for x in ranked} & set(tokenizer.all_special_tokens)


def test_fill_every_mask_and_errors(mlm_run, clm_run):
    result = _fill(mlm_run[0], "To be or not to {mask}, that is the {mask}.", top_k=2)[0]
    assert len(result["masks"]) == 2 and all(len(m) == 2 for m in result["masks"])
    with pytest.raises(UsageError, match=r"no mask in 'The sun is bright.': write \{mask\} \(or \[MASK\]\)"):
        _fill(mlm_run[0], "The sun is bright.")
    with pytest.raises(LlmkitError, match="causal .* language model, not a masked .*llmkit generate"):
        _fill(clm_run[0], "The {mask} is bright.")


def test_fill_entry_point(mlm_run):
    r = run("fill", "The {mask} is bright.", "--model", str(mlm_run[0]), "--top-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(json.dumps(_fill(mlm_run[0], "The {mask} is bright.", top_k=3)[0]))


def test_fill_shows_each_mask(mlm_run, capsys):
    from llmkit.cli import show_fill

    cfg = build_config(FillConfig, flags={"texts": ["The {mask} is {mask}."], "model": str(mlm_run[0]), "top_k": 3})
    show_fill(cfg, fill(cfg))
    filled, first, second = capsys.readouterr().out.splitlines()
    assert filled.startswith("The ") and filled.endswith(".") and "{mask}" not in filled
    assert first.startswith("  mask 1: ") and second.startswith("  mask 2: ") and len(first.split("  ")) == 4


# ---------------------------------------------------------------------------------------------------------------
# env


def test_auto_precision_follows_the_measured_bf16_speed(monkeypatch, capsys):
    """A launched job's ranks take the launcher's measurement (the environment variable) and pick by it; bf16
    asked for on a CPU without bf16 instructions (a measurement of 0) runs, with a warning."""
    from llmkit.train import BF16_SPEEDUP_ENV, cpu_bf16_speedup, resolve_precision

    cpu = torch.device("cpu")
    try:
        for speedup, expected in (("2.5", "bf16"), ("0.55", "fp32"), ("1.29", "fp32"), ("0", "fp32")):
            cpu_bf16_speedup.cache_clear()
            monkeypatch.setenv(BF16_SPEEDUP_ENV, speedup)
            assert resolve_precision("auto", cpu) == expected
            capsys.readouterr()
            assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
            warned = "no bf16 instructions" in capsys.readouterr().err
            assert warned == (speedup == "0"), speedup
    finally:
        monkeypatch.delenv(BF16_SPEEDUP_ENV)
        cpu_bf16_speedup.cache_clear()


def test_env_reports_what_llmkit_runs_with(isolated_cache):
    from importlib import metadata

    from llmkit.train import FAST_BF16_SPEEDUP, cpu_bf16_speedup, cpu_has_fast_bf16

    info = env(EnvConfig())
    assert info["versions"]["llmkit"] == metadata.version("llmkit")
    assert info["versions"]["torch"] == torch.__version__
    cpu = info["devices"][-1]
    assert cpu["device"] == "cpu" and cpu["cores"] == os.cpu_count() and cpu["bf16_fast"] == cpu_has_fast_bf16()
    # auto takes bf16 on a CPU only where its matrix products were measured faster than fp32's
    assert cpu["bf16_fast"] == (cpu_bf16_speedup() >= FAST_BF16_SPEEDUP)
    assert cpu["bf16_matmul_speedup"] == round(cpu_bf16_speedup(), 2)
    if not torch.cuda.is_available():
        assert info["precision_auto"] == ("bf16" if cpu["bf16_fast"] else "fp32")
    assert len(info["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["precision_auto"] in ("fp32", "bf16", "fp16")
    assert info["cache_dir"] == str(isolated_cache)  # $LLMKIT_CACHE, set by the session fixture
    assert info["hub"] == "offline"


def test_env_entry_point_shows_the_accelerate_config(tmp_path):
    home = tmp_path / "hf"
    r = run("env", "--json", env={**os.environ, "HF_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accelerate_config"] == {
        "path": str(home / "accelerate" / "default_config.yaml"), "exists": False}
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 4\nmixed_precision: bf16\n")
    r = run("env", env={**os.environ, "HF_HOME": str(home), "COLUMNS": "500"})  # no arguments: runs, no help
    assert r.returncode == 0, r.stderr
    assert "distributed_type MULTI_GPU, num_processes 4, mixed_precision bf16" in r.stdout
    assert "transformers" in r.stdout and "cpu" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# recipes


def test_recipes_lists_every_shipped_recipe(monkeypatch):
    from llmkit.recipes import COMMANDS, recipe_files

    monkeypatch.chdir(ROOT)
    found = recipes(RecipesConfig())
    assert len(found) == len(recipe_files()) > 0
    by_path = {r["path"]: r for r in found}
    assert by_path["recipes/sst2-minilm.yaml"]["command"] == "finetune"
    assert by_path["recipes/shakespeare/pretrain.yaml"]["command"] == "pretrain"
    assert all(r["command"] in COMMANDS and r["description"] for r in found)


def test_recipes_entry_point():
    r = run("recipes", cwd=ROOT, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "recipes/sst2-minilm.yaml" in line)
    assert "finetune" in row and "all-MiniLM-L6-v2 on SST-2" in row
    r = run("recipes", "--json", cwd=ROOT)
    assert len(json.loads(r.stdout)) == len(recipes(RecipesConfig()))


# ---------------------------------------------------------------------------------------------------------------
# plot


def _classifier_run(path: Path, metric: str = "f1_macro") -> Path:
    """A run directory as `llmkit finetune` leaves it: log lines with loss, evaluation lines with eval_*."""
    path.mkdir(parents=True)
    lines = [{"step": 5, "loss": 0.69}, {"step": 10, "loss": 0.61},
             {"step": 10, "eval_loss": 0.63, "eval_accuracy": 0.62, "eval_f1_macro": 0.58},
             {"step": 15, "loss": 0.52}, {"step": 20, "loss": 0.47},
             {"step": 20, "eval_loss": 0.55, "eval_accuracy": 0.71, "eval_f1_macro": 0.69}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 25, "lo')
    (path / "llmkit_run.json").write_text(json.dumps({"config": {"metric": metric}}))
    return path


def _image(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_curves_read_every_logged_point(clm_run, tmp_path):
    from llmkit.plot import read_curves

    run_dir, _ = clm_run
    logged = read_metrics(run_dir)
    curves = read_curves(run_dir)
    assert curves.train_loss == [(x["step"], x["loss"]) for x in logged if "loss" in x]
    assert curves.eval_loss == [(x["step"], x["eval_loss"]) for x in logged if "eval_loss" in x]
    assert len(curves.eval_loss) >= 2 and curves.metric is None  # a language model: loss only
    classifier = read_curves(_classifier_run(tmp_path / "cls"))  # the partial last line is skipped
    assert classifier.metric == "eval_f1_macro" and classifier.eval_metric == [(10, 0.58), (20, 0.69)]
    assert classifier.train_loss[-1] == (20, 0.47)
    assert read_curves(_classifier_run(tmp_path / "cls-loss", metric="loss")).metric == "eval_accuracy"


def test_plot_compares_runs(clm_run, mlm_run, tmp_path):
    lm = plot(PlotConfig(run_dirs=[str(clm_run[0]), str(mlm_run[0])], output=str(tmp_path / "lm.png")))
    assert lm == tmp_path / "lm.png"
    with_metric = plot(PlotConfig(run_dirs=[str(clm_run[0]), str(_classifier_run(tmp_path / "cls"))],
                                  output=str(tmp_path / "out" / "both.png")))
    one_panel, two_panels = _image(lm), _image(with_metric)
    assert two_panels.shape[1] > 1.4 * one_panel.shape[1]  # the classifier's metric gets a panel of its own
    assert len({tuple(px) for px in one_panel.reshape(-1, one_panel.shape[-1])[::7].tolist()}) > 20  # not blank
    assert not list(tmp_path.glob("**/.*.tmp"))  # written atomically


def test_plot_errors(clm_run, tmp_path):
    with pytest.raises(LlmkitError, match="has no metrics.jsonl: give a run directory"):
        plot(PlotConfig(run_dirs=[str(clm_run[0] / "best")], output=str(tmp_path / "x.png")))
    with pytest.raises(UsageError, match="give a file name ending in .png, .svg, .pdf"):
        plot(PlotConfig(run_dirs=[str(clm_run[0])], output=str(tmp_path / "x.gif")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(LlmkitError, match="holds no logged step yet"):
        plot(PlotConfig(run_dirs=[str(tmp_path / "empty")], output=str(tmp_path / "x.png")))
    assert not (tmp_path / "x.png").exists()


def test_plot_entry_point(clm_run, tmp_path):
    output = tmp_path / "curves.svg"
    r = run("plot", str(clm_run[0]), "--output", str(output))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(output) and output.read_text().lstrip().startswith("<?xml")
    r = run("plot", str(tmp_path / "missing"), "-o", str(tmp_path / "c.png"))
    assert r.returncode == 1 and "missing does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr


def test_help_lists_the_new_commands():
    r = run("--help", env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for name in ("generate", "fill", "env", "recipes", "plot"):
        assert f" {name} " in r.stdout
