"""ctalign: tokenizer alignment for cross-tokenizer knowledge distillation."""
__version__ = "0.1.0"
