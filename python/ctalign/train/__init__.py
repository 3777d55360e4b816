"""Training with ctalign: ``ctalign distill`` and :func:`distill`, a small loop over transformers
models and the project's losses.

    >>> from ctalign.train import DistillConfig, distill
    >>> report = distill(DistillConfig(student="smollm2.gguf", teachers=["gemma.gguf"], loss="likelihood",
    ...                                train=["train.txt"], eval=["held-out.txt"], steps=30))  # doctest: +SKIP

Modules: ``loop`` (the loop and its config), ``students``, ``sources`` (live or cached teachers),
``objectives`` (the losses, one or several teachers), ``sampling`` (on-policy continuations),
``evaluate`` (bits per byte), ``report``.
"""
from __future__ import annotations

from ctalign.train.evaluate import bits_per_byte
from ctalign.train.loop import DistillConfig, distill

__all__ = ["DistillConfig", "distill", "bits_per_byte"]
