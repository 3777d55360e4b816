"""The vocabularies, maps and tensors of a run, loaded once and shared by its cases; the synthetic
262k vocabulary built from the union of real ones.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Any, Callable

from ctalign.bench.config import (VOCABS, SYNTHETIC_VOCAB, SYNTHETIC_SIZE, _UNION_SOURCES, _DTYPES, _PAD_TO,
                                  _SEED)


def load_bench_vocab(name: str):
    """A benchmark vocabulary by short name (``VOCABS`` keys or ``SYNTHETIC_VOCAB``)."""
    from ctalign import assets
    from ctalign.vocab import load_vocab

    if name == SYNTHETIC_VOCAB:
        return synthetic_vocab()
    if name not in VOCABS:
        raise ValueError(f"unknown benchmark vocabulary {name!r}; known: "
                         f"{', '.join(list(VOCABS) + [SYNTHETIC_VOCAB])}")
    if name == "gpt2":  # GPT-2's own pair of files
        return load_vocab((assets.path("gpt2-encoder"), assets.path("gpt2-merges")), name="gpt2")
    return load_vocab(assets.path(VOCABS[name]), name=name)


class _GreedyEncoder:
    """Encoder of the synthetic vocabulary, which has no merges of its own: greedy longest match
    over its token bytes (every single byte is a token, so any byte string encodes)."""

    def __init__(self, pieces: list[bytes | None]):
        self.index: dict[bytes, int] = {}
        for i, b in enumerate(pieces):
            if b is not None:
                self.index.setdefault(b, i)
        self.max_len = max(map(len, self.index))

    def encode_bytes(self, b: bytes) -> list[int]:
        out, i = [], 0
        while i < len(b):
            for n in range(min(self.max_len, len(b) - i), 0, -1):
                t = self.index.get(b[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                raise ValueError(f"byte {b[i]:#04x} is not a token of {SYNTHETIC_VOCAB}")
        return out

    def encode_text(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_raw_texts(self, texts: list[str]) -> list[list[int]]:
        return [self.encode_text(t) for t in texts]

    def encode_raw_invalid(self, pieces: list[bytes]) -> list[list[int]]:
        return [self.encode_bytes(p) for p in pieces]

    def normalize(self, text: str) -> str:
        return text


def synthetic_vocab(size: int = SYNTHETIC_SIZE):
    """A ``size``-token vocabulary made of real token byte strings: the union of the byte strings of
    several real vocabularies (``_UNION_SOURCES``, in that order, first occurrence kept), cut to
    ``size - 1``, plus one special (eos) as the last id. Stands in for the 256k-class tokenizers
    (Gemma) that no registry package ships. Its encoder is a greedy longest match (see
    ``_GreedyEncoder``): use it as a teacher, whose tables are all the ops and build_map read."""
    from ctalign import assets
    from ctalign.vocab import Vocab, load_vocab

    seen: set[bytes] = set()
    pieces: list[bytes | None] = []
    for src in _UNION_SOURCES:
        v = load_bench_vocab(src) if src in VOCABS else load_vocab(assets.path(src), name=src)
        for b in v.all_token_bytes():
            if b is not None and b not in seen:
                seen.add(b)
                pieces.append(b)
        if len(pieces) >= size - 1:
            break
    if len(pieces) < size - 1:
        raise RuntimeError(f"the union of {', '.join(_UNION_SOURCES)} holds only {len(pieces)} "
                           f"distinct tokens, fewer than {size - 1}")
    pieces = pieces[:size - 1] + [None]
    eos = size - 1
    return Vocab(name=SYNTHETIC_VOCAB, source="union of " + ", ".join(_UNION_SOURCES), kind="byte_bpe",
                 pieces=pieces, special_text={eos: "<|endoftext|>"}, roles={eos: "eos"},
                 backend=_GreedyEncoder(pieces))


def _parse_pair(text: str) -> tuple[str, str]:
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"a pair is TEACHER:STUDENT, got {text!r}")
    t, s = text.split(":", 1)
    for n in (t, s):
        if n not in VOCABS and n != SYNTHETIC_VOCAB:
            raise argparse.ArgumentTypeError(
                f"unknown vocabulary {n!r} in pair {text!r}; known: {', '.join(list(VOCABS) + [SYNTHETIC_VOCAB])}")
    return t, s


def _padded(v: int) -> int:
    return -(-v // _PAD_TO) * _PAD_TO


def _as_numpy(x):
    """A writable numpy copy of a core array or tensor (torch refuses read-only numpy views)."""
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


class Workspace:
    """Vocabularies, maps, their tables as tensors, and logits, loaded once per run."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self._vocabs: dict[str, Any] = {}
        self._maps: dict[tuple[str, str], Any] = {}
        self._tensors: dict[tuple, Any] = {}
        self._logits_key: tuple | None = None
        self._logits = None

    def vocab(self, name: str):
        if name not in self._vocabs:
            t0 = time.perf_counter()
            self._vocabs[name] = load_bench_vocab(name)
            self.log(f"  loaded {name} ({len(self._vocabs[name]):,} tokens) in {time.perf_counter() - t0:.1f} s")
        return self._vocabs[name]

    def amap(self, teacher: str, student: str):
        key = (teacher, student)
        if key not in self._maps:
            from ctalign.alignment_map import build_map

            vt, vs = self.vocab(teacher), self.vocab(student)
            t0 = time.perf_counter()
            self._maps[key] = build_map(vt, vs)
            self.log(f"  built map {teacher} -> {student} ({self._maps[key].regime}) in {time.perf_counter() - t0:.1f} s")
        return self._maps[key]

    def table(self, key: tuple, make: Callable[[], Any]):
        """A derived tensor (group arrays, dense matrices...) cached under ``key``."""
        if key not in self._tensors:
            self._tensors[key] = make()
        return self._tensors[key]

    def drop_tables(self, pred: Callable[[tuple], bool]) -> None:
        for k in [k for k in self._tensors if pred(k)]:
            del self._tensors[k]

    def logits(self, rows: int, width: int, dtype: str, device: str):
        """Random logits ``[rows, width]`` (N(0, 3^2), fixed seed); one tensor kept at a time."""
        import torch

        key = (rows, width, dtype, device)
        if self._logits_key != key:
            self._logits = None
            gc.collect()
            g = torch.Generator(device=device).manual_seed(_SEED)
            x = torch.randn(rows, width, generator=g, device=device, dtype=torch.float32)
            x.mul_(3.0)
            self._logits = x.to(getattr(torch, _DTYPES[dtype]))
            self._logits_key = key
        return self._logits

    def release_logits(self) -> None:
        self._logits = None
        self._logits_key = None
        gc.collect()


# tables of vocabularies and maps (numpy views from the core, as torch tensors) ------------------
def _first_byte(vocab):
    trie = vocab.trie
    fb = getattr(trie, "first_byte", None)
    return _as_numpy(fb() if callable(fb) else fb)


def _trie_order(vocab):
    order = vocab.trie.order
    return _as_numpy(order() if callable(order) else order)


def _map_array(amap, name: str):
    a = getattr(amap, name)
    return _as_numpy(a() if callable(a) else a)


def _student_size(amap) -> int:
    n = getattr(amap, "n_student", None)
    return int(n) if n is not None else len(amap.student)
