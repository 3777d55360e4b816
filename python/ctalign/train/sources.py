"""Teachers of a distillation run: a live model (a transformers folder or a GGUF file) or a teacher cache
(a folder written by ``ctalign cache-teacher``), each with its map onto the student and its collator.

``TEACHER[=WEIGHT]`` on the command line; the first teacher's collator makes the batch (the student's
tokenization and the texts), the others score the same texts.
"""
from __future__ import annotations

import time
from pathlib import Path

from ctalign.errors import CtalignError
from ctalign.train.objectives import TeacherBatch


def parse_teacher_spec(spec: str) -> tuple[str, float]:
    path, eq, weight = str(spec).rpartition("=")
    if not eq or not path:
        return str(spec), 1.0
    try:
        w = float(weight)
    except ValueError:
        return str(spec), 1.0  # an '=' inside a path
    if not w > 0:
        raise CtalignError(f"{spec!r}: a teacher's weight must be positive")
    return path, w


class TeacherSource:
    def __init__(self, spec: str, weight: float, student_vocab, *, max_length, byte_queries: int, seed: int,
                 primary: bool):
        from ctalign import build_map
        from ctalign.cache import CachedDistillationCollator, TeacherCache
        from ctalign.cache.teachers import resolve_teacher
        from ctalign.data import DistillationCollator

        self.spec, self.weight = spec, weight
        path = Path(spec)
        if not path.exists():
            raise CtalignError(f"{path}: no such teacher (a transformers folder, a .gguf file or a teacher cache)")
        self.cache = None
        self.model = None
        t0 = time.perf_counter()
        if path.is_dir() and ((path / "index.json").exists() or any(path.glob("index-rank*-of-*.json"))):
            self.cache = TeacherCache(path)
            self.vocab = _cache_vocab(self.cache)
            self.name = self.cache.config["teacher"]["name"]
        else:
            t = resolve_teacher(spec)
            self.model, self.vocab, self.name = t.forward, t.vocab, t.name
        self.load_s = time.perf_counter() - t0
        self.amap = build_map(self.vocab, student_vocab)
        if self.cache is not None:
            self.cache.check_teacher(self.amap)
            if not primary:
                raise CtalignError(f"{spec}: a teacher cache can only be the first --teacher (its examples make "
                                   f"the batches); give the other teachers as models")
            self.collate = CachedDistillationCollator(self.amap, cache=self.cache, max_length=max_length,
                                                      byte_queries=byte_queries)
        else:
            self.collate = DistillationCollator(self.amap, max_length=max_length if primary else None,
                                                byte_queries=byte_queries)

    @property
    def live(self) -> bool:
        return self.model is not None

    def rows_for(self, batch: dict) -> tuple[TeacherBatch, float]:
        """The teacher's rows for a batch made by this teacher's collator; returns (rows, seconds)."""
        import torch

        t0 = time.perf_counter()
        if self.cache is not None:
            rows, own = batch["teacher_topk"], batch["teacher_own_logprob"]
        else:
            with torch.no_grad():
                out = self.model(batch["teacher_input_ids"], batch["teacher_attention_mask"])
            rows, own = getattr(out, "logits", out).detach(), None
        tb = TeacherBatch(rows=rows, input_ids=batch["teacher_input_ids"], loss_mask=batch["teacher_loss_mask"],
                          alignment=batch["alignment"], own_logprob=own, amap=self.amap, vocab=self.vocab)
        return tb, time.perf_counter() - t0


def _cache_vocab(cache):
    """The teacher tokenizer of a cache: the file its index names, checked by fingerprint."""
    from ctalign.vocab import load_vocab

    info = cache.config["teacher"]
    src = info.get("tokenizer")
    if not src:
        raise CtalignError(f"{cache.root}: the cache does not name its teacher tokenizer file")
    vocab = load_vocab(src)
    if vocab.fingerprint != info["fingerprint"]:
        raise CtalignError(f"{cache.root}: the teacher tokenizer {src} has changed since the cache was written "
                           f"(fingerprint {vocab.fingerprint[:12]}, the cache has {info['fingerprint'][:12]})")
    return vocab
