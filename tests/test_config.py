"""Settings: recipes and flags merge, every problem is named, shipped recipes load."""

from pathlib import Path

import pytest

from llmkit.config import FinetuneConfig, PretrainConfig, build_config, load_recipe
from llmkit.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def test_flags_win_over_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 3e-4\nmax_steps: 100\ndata: a.txt\noutput: out\n")
    cfg = build_config(PretrainConfig, load_recipe(recipe), {"max_steps": 7})
    assert cfg.learning_rate == pytest.approx(3e-4)  # PyYAML reads 3e-4 as a string: still a number here
    assert cfg.max_steps == 7
    assert cfg.data == ["a.txt"]


def test_unknown_key_suggests_the_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.1\ndata: a.txt\noutput: o\n")
    with pytest.raises(UsageError, match=r"unknown key `learning_rat`.*did you mean `learning_rate`"):
        build_config(PretrainConfig, load_recipe(recipe))


def test_every_problem_is_reported_at_once():
    with pytest.raises(UsageError) as e:
        build_config(PretrainConfig, {"max_steps": "many", "learning_rate": -1, "objective": "gan"},
                     {"data": ["x.txt"], "output": "o"})
    text = str(e.value)
    assert "`max_steps` must be a whole number" in text
    assert "--learning-rate must be greater than 0" in text
    assert "--objective must be one of clm, mlm" in text


def test_required_and_types():
    with pytest.raises(UsageError, match="--model is required"):
        build_config(FinetuneConfig, flags={"data": ["x.tsv"], "output": "o"})
    with pytest.raises(UsageError, match="`compile` must be true or false"):
        build_config(PretrainConfig, {"compile": "yes"}, {"data": ["x"], "output": "o"})


def test_yaml_syntax_error_names_the_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("max_steps: 10\nlearning_rate: [1e-3\n")
    with pytest.raises(UsageError, match=r"not valid YAML at line \d+"):
        load_recipe(recipe)


def test_every_shipped_recipe_loads():
    recipes = [p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts]
    assert recipes, "recipes/ holds no recipe"
    from llmkit.recipes import config_class_of

    for path in recipes:
        cls = config_class_of(path)
        required = {"data": ["x"], "output": "o", "model": "tiny", "texts": ["t"]}
        fields = cls.__dataclass_fields__
        build_config(cls, load_recipe(path), {k: v for k, v in required.items() if k in fields})
        first = path.read_text().splitlines()[0]
        assert first.startswith("# llmkit "), f"{path} does not start with the command that runs it"
