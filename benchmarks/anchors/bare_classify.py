"""Anchor for start-up time: the bare minimum to classify one text in a fresh process - import transformers,
load the tokenizer and the model, one forward pass, print the label.

Usage (from the project root): python benchmarks/anchors/bare_classify.py MODEL_DIR "some text"
"""
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir, text = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
with torch.inference_mode():
    logits = model(**tokenizer(text, return_tensors="pt")).logits
print(model.config.id2label[int(logits.argmax(-1))])
