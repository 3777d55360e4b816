"""Brute-force marginals over covers, the ground truth of the exact targets and the lossless scorer.

A *teacher* here is a deterministic function from a teacher-token prefix to a logits row
(:class:`HashTeacher`). A teacher vocabulary is spelled in *units* (:class:`Units`): bytes, or
student ids through ``dec_S``. A *cover* of the unit prefix ``x[:m]`` is a teacher token sequence
whose units spell ``x[:l]`` exactly for some ``l <= m`` (what follows it then decides the units after
``l``). The next-unit distribution after ``x[:m]`` is the sum, over covers, of their probability
times the probability that the next teacher token continues ``x[l:m]`` with each unit (for
``l = m``: the next token's first unit). Everything is float64 numpy over the whole vocabulary:
no tries, no ops.
"""
from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np
import torch


class HashTeacher:
    """logits(prefix) = scale x N(0, 1) seeded by the prefix's ids (plus ``bias``, e.g. to favour
    long tokens): a fixed 'model' that can be asked for any prefix, float64."""

    def __init__(self, width: int, scale: float = 2.5, salt: int = 0, bias=None):
        self.width, self.scale, self.salt = width, scale, salt
        self.bias = None if bias is None else torch.as_tensor(bias, dtype=torch.float64)
        self._cache: dict = {}

    def row(self, prefix) -> torch.Tensor:
        key = tuple(int(t) for t in prefix)
        r = self._cache.get(key)
        if r is None:
            seed = zlib.crc32(np.asarray(key, dtype=np.int64).tobytes()) ^ self.salt
            r = torch.randn(self.width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * self.scale
            if self.bias is not None:
                r = r + self.bias
            self._cache[key] = r
        return r

    def __call__(self, sequences) -> torch.Tensor:
        """[N, width]: the next-token logits after each sequence (the scorer's callable)."""
        return torch.stack([self.row(s) for s in sequences])

    def logits(self, ids_rows, n_tokens: int | None = None) -> torch.Tensor:
        """[B, L, width]: row k of sequence b = logits after ids[b][:k + 1] (a forward pass)."""
        L = max(len(r) for r in ids_rows)
        out = torch.zeros(len(ids_rows), L, self.width, dtype=torch.float64)
        for b, r in enumerate(ids_rows):
            for k in range(len(r)):
                out[b, k] = self.row(r[:k + 1])
        return out


class Units:
    """A teacher vocabulary spelled in units: ``seqs[t]`` (a tuple; empty for tokens without units),
    ``first[t]`` (its first unit; for a token without units, the column it goes to), ``width``."""

    def __init__(self, seqs, first, width: int):
        self.seqs, self.first, self.width = seqs, np.asarray(first, dtype=np.int64), int(width)
        self.full: dict = defaultdict(list)
        ext: dict = defaultdict(lambda: ([], []))
        for t, q in enumerate(seqs):
            if not q:
                continue
            self.full[q].append(t)
            for i in range(1, len(q)):
                ids, nxt = ext[q[:i]]
                ids.append(t)
                nxt.append(q[i])
        self.ext = {k: (np.asarray(v[0]), np.asarray(v[1])) for k, v in ext.items()}
        self.maxlen = max(len(q) for q in seqs)

    @staticmethod
    def student(amap) -> "Units":
        seqs = [tuple(amap.dec(t)) if amap.teacher.token_bytes(t) is not None else () for t in range(amap.n_teacher)]
        return Units(seqs, np.asarray(amap.first_student), amap.n_student + 1)

    @staticmethod
    def bytes_of(vocab) -> "Units":
        seqs = [tuple(vocab.token_bytes(t) or b"") for t in range(len(vocab))]
        return Units(seqs, [q[0] if q else 256 for q in seqs], 257)


def probs(teacher, prefix, n: int) -> np.ndarray:
    return torch.softmax(teacher.row(prefix)[:n], -1).numpy()


def covers(units: Units, x, m: int, teacher, ctx, n_teacher: int, keep=None):
    """Every cover ``(prefix, l, logp)`` of ``x[:m]`` (depth first), ``prefix`` after the context
    ``ctx``; ``keep(prefix)`` prunes (a cover is kept only if every prefix of it is)."""
    out, stack = [], [((), 0, 0.0)]
    x = tuple(x)
    while stack:
        pre, l, lp = stack.pop()
        out.append((pre, l, lp))
        if l >= m:
            continue
        p = None
        for l2 in range(l + 1, min(m, l + units.maxlen) + 1):
            for t in units.full.get(x[l:l2], ()):
                new = pre + (t,)
                if keep is not None and not keep(new):
                    continue
                if p is None:
                    p = probs(teacher, tuple(ctx) + pre, n_teacher)
                if p[t] > 0:
                    stack.append((new, l2, lp + float(np.log(p[t]))))
    return out


def next_unit(units: Units, x, m: int, teacher, ctx, n_teacher: int, cover_list) -> np.ndarray:
    """Unnormalised next-unit masses [width] after ``x[:m]`` from the given covers."""
    q = np.zeros(units.width)
    x = tuple(x)
    for pre, l, lp in cover_list:
        w = np.exp(lp)
        p = probs(teacher, tuple(ctx) + pre, n_teacher)
        if l < m:
            hit = units.ext.get(x[l:m])
            if hit is not None:
                np.add.at(q, hit[1], w * p[hit[0]])
        else:
            q += w * np.bincount(units.first, weights=p, minlength=units.width)
    return q


def prefix_mass(units: Units, x, m: int, teacher, ctx, n_teacher: int, cover_list) -> float:
    """P(x[:m]): covers ending before m times the mass of next tokens that start with the rest."""
    if m == 0:
        return 1.0
    x = tuple(x)
    total = 0.0
    for pre, l, lp in cover_list:
        if l >= m:
            continue
        p = probs(teacher, tuple(ctx) + pre, n_teacher)
        rest = x[l:m]
        ids = list(units.full.get(rest, ()))
        hit = units.ext.get(rest)
        mass = float(p[ids].sum()) if ids else 0.0
        if hit is not None:
            mass += float(p[hit[0]].sum())
        total += np.exp(lp) * mass
    return total


def restricted_covers(units, x, m, teacher, ctx, n_teacher, canon, allowed):
    """The covers the exact targets account for: the teacher's own tokens ``canon[:a]`` for ``a`` in
    ``allowed`` (the cover's tokens are never anything else)."""
    keep = lambda pre: tuple(pre) == tuple(canon[:len(pre)])  # noqa: E731
    return [c for c in covers(units, x, m, teacher, ctx, n_teacher, keep) if len(c[0]) in allowed]
