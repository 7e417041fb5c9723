"""duobench: a benchmark and evaluation harness for concept unlearning in text-to-image diffusion models."""

__version__ = "0.1.0"
