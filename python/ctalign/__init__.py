"""ctalign: tokenizer alignment for cross-tokenizer knowledge distillation.

    >>> import ctalign
    >>> amap = ctalign.build_map("teacher/tokenizer.json", "student/tokenizer.json")  # doctest: +SKIP
    >>> q = ctalign.ops.project_to_student(teacher_logits, amap)                       # doctest: +SKIP

Submodules are imported lazily so that ``import ctalign`` stays cheap and never needs torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    # name -> (module, attribute or None for the module itself)
    "load_vocab": ("ctalign.vocab", "load_vocab"),
    "Vocab": ("ctalign.vocab", "Vocab"),
    "build_map": ("ctalign.alignment_map", "build_map"),
    "AlignmentMap": ("ctalign.alignment_map", "AlignmentMap"),
    "TopK": ("ctalign.ops", "TopK"),
    "ops": ("ctalign.ops", None),
    "reference": ("ctalign.ops.reference", None),
    "losses": ("ctalign.losses", None),
    "align": ("ctalign.align", None),
    "data": ("ctalign.data", None),
    "assets": ("ctalign.assets", None),
    "cache": ("ctalign.cache", None),
    "load_gguf_model": ("ctalign.models", "load_gguf_model"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ctalign' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
