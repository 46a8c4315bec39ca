"""The quick start (`make demo`) on tiny budgets: every step runs, prints its command and hands the next step
what it needs; what the demo promises to leave behind is there and loads in transformers."""

import json
import math
import os
import re
import subprocess
import sys

from llmkit.demo import LINE

STEPS = [("python", "prepare.py"), ("llmkit", "tokenize"), ("llmkit", "pretrain"), ("llmkit", "evaluate"),
         ("llmkit", "finetune"), ("llmkit", "evaluate"), ("llmkit", "classify")]


def test_quick_demo_runs_the_whole_story(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "LLMKIT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "llmkit.demo", "--quick", "--root", str(root)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]

    commands = [line.split() for line in r.stderr.splitlines() if line.startswith("$ ")]
    assert [(c[1], c[2].rsplit("/", 1)[-1]) for c in commands] == STEPS, r.stderr
    assert all(str(root) in " ".join(c) for c in commands)  # each one names its --output or --model
    assert "--model tiny" in " ".join(commands[2])  # the printed command is the one that ran, with --quick's flags
    assert "done in" in r.stderr

    lm = AutoModelForCausalLM.from_pretrained(root / "lm")
    tokenizer = AutoTokenizer.from_pretrained(root / "lm")
    assert lm.config.vocab_size >= len(tokenizer) == 2048
    classifier = AutoModelForSequenceClassification.from_pretrained(root / "genre" / "best")
    assert sorted(classifier.config.id2label.values()) == ["comedy", "tragedy"]

    held_out = len((root / "data" / "eval.jsonl").read_text().splitlines())
    lm_metrics = json.loads((root / "lm-eval.json").read_text())
    assert math.isfinite(lm_metrics["perplexity"]) and lm_metrics["perplexity"] > 1 and lm_metrics["tokens"] > 0
    genre_metrics = json.loads((root / "genre-eval.json").read_text())
    assert genre_metrics["examples"] == held_out and 0 <= genre_metrics["accuracy"] <= 1
    assert set(genre_metrics["per_class"]) == {"comedy", "tragedy"}  # both genres held out

    label = r"(comedy|tragedy) [01]\.\d+"
    assert re.search(rf"^{label}\s+{label}\s+{re.escape(LINE)}$", r.stdout, re.MULTILINE), r.stdout[-2000:]
