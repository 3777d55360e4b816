"""A GGUF model file as a torch model plus ctalign's vocabulary of the same file.

    >>> from ctalign import load_gguf_model
    >>> model, vocab = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP

The weights go through transformers (``from_pretrained(folder, gguf_file=name)``), which
dequantises them to float32 on the CPU; the quantizer marker it leaves on the model is cleared so
that ``transformers.Trainer`` (and TRL) fine-tune it. The vocabulary is ``load_vocab(path)``: the
GGUF tokenizer exactly as llama.cpp encodes it. Needs the ``train`` extra
(``pip install ctalign[train]``: torch, transformers, accelerate, gguf).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ctalign.errors import VocabError

__all__ = ["load_gguf_model"]


def load_gguf_model(path: str | os.PathLike, *, torch_dtype: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """(model, vocab) of the GGUF file ``path``: a ``transformers`` causal LM and the
    :class:`~ctalign.vocab.Vocab`. ``torch_dtype`` and ``kwargs`` go to ``from_pretrained``."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise VocabError(f"{p}: no such file")
    from ctalign.vocab import load_vocab
    vocab = load_vocab(p)  # first: a file that is no usable GGUF fails fast, with ctalign's error
    try:
        import transformers
    except ImportError:
        raise ImportError("load_gguf_model needs transformers, accelerate and gguf: "
                          "pip install ctalign[train]") from None
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.eval()
    return model, vocab
