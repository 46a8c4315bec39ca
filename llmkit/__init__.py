"""llmkit: pretrain, fine-tune, evaluate and use transformer language models."""

__version__ = "0.1.0"
