"""multitune: multi-task fine-tuning of pre-trained causal language models."""

__version__ = "0.1.0"
