"""Teachers the cache can run: any callable returning logits, a transformers model folder, a GGUF file.

A teacher here is ``fn(input_ids [B, L] int64, attention_mask [B, L] int64) -> logits [B, L, W]``
(a tensor, or an object with ``.logits`` such as a transformers output), plus the teacher's
:class:`~ctalign.vocab.Vocab` and a display name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ctalign.errors import CtalignError


@dataclass
class Teacher:
    forward: Callable[[Any, Any], Any]
    vocab: Any
    name: str


def _model_forward(model):
    import torch

    def forward(input_ids, attention_mask):
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask).logits

    return forward


def resolve_teacher(teacher, teacher_vocab=None, name: str | None = None, device=None) -> Teacher:
    """A :class:`Teacher` from a callable (``teacher_vocab`` required), a transformers model folder
    (its tokenizer files give the vocabulary) or a ``.gguf`` file (weights and vocabulary from it)."""
    from ctalign.vocab import load_vocab

    if isinstance(teacher, Teacher):
        return teacher
    if callable(teacher) and not isinstance(teacher, (str, Path)):
        if teacher_vocab is None:
            raise CtalignError("a callable teacher needs teacher_vocab= (its tokenizer: a path or a Vocab)")
        vocab = load_vocab(teacher_vocab)
        forward = _model_forward(teacher) if hasattr(teacher, "config") and hasattr(teacher, "generate") else teacher
        return Teacher(forward, vocab, name or getattr(teacher, "__name__", type(teacher).__name__))
    path = Path(teacher)
    if not path.exists():
        raise CtalignError(f"{path}: no such teacher model (a transformers folder or a .gguf file)")
    if path.suffix == ".gguf":
        vocab = load_vocab(path)  # fast; the weights load on the first call (a resumed cache may need none)
    else:
        vocab = load_vocab(teacher_vocab if teacher_vocab is not None else path)
    return Teacher(_LazyModel(path, device), vocab, name or path.name)


class _LazyModel:
    """A model file's forward, loading the weights on the first call."""

    def __init__(self, path: Path, device):
        self.path, self.device, self._forward, self.model = path, device, None, None

    def load(self):
        if self.model is None:
            if self.path.suffix == ".gguf":
                try:
                    from ctalign.models import load_gguf_model
                    model, _ = load_gguf_model(self.path)
                except ImportError as e:
                    raise CtalignError(f"{self.path}: loading a GGUF teacher needs the train extra "
                                       f"(pip install 'ctalign[train]'): {e}") from None
            else:
                try:
                    from transformers import AutoModelForCausalLM
                except ImportError:
                    raise CtalignError(f"{self.path}: loading a transformers teacher needs the train extra "
                                       f"(pip install 'ctalign[train]')") from None
                try:
                    model = AutoModelForCausalLM.from_pretrained(self.path)
                except (OSError, ValueError) as e:
                    raise CtalignError(f"{self.path}: cannot load the teacher with transformers "
                                       f"({' '.join(str(e).split())[:300]})") from None
            model.eval()
            if self.device is not None:
                model.to(self.device)
            self.model, self._forward = model, _model_forward(model)
        return self.model

    def __call__(self, input_ids, attention_mask):
        self.load()
        return self._forward(input_ids, attention_mask)
