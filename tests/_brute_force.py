"""Brute-force definitions of the projection ops (docs/design.md), the tests' ground truth.

Every quantity is a loop over the teacher vocabulary with ``token_bytes`` and ``dec_S`` in float64:
no tries, sorted orders or torch. A prefix's mass is accumulated by walking every token's own
prefixes, which is the definition ("the tokens whose bytes start with the prefix") spelled out.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

NEG_INF = float("-inf")
ROLES_WITH_TARGET = ("bos", "eos", "pad", "unk")


def softmax64(row, vocab_size: int, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of one logits row in float64 (padding columns beyond vocab_size ignored)."""
    x = np.asarray(row, dtype=np.float64)[:vocab_size] / temperature
    x = x - x.max()
    p = np.exp(x)
    return p / p.sum()


def log(m: float) -> float:
    return math.log(m) if m > 0 else NEG_INF


def log_ratio(num: float, den: float) -> float:
    return NEG_INF if den <= 0 else log(num) - math.log(den)


class SequenceMasses:
    """mass(prefix), ended(prefix) and the mass of member-less tokens of one distribution, where each
    token's sequence is given by `sequence_of(t)` (bytes, or a tuple of student ids)."""

    def __init__(self, p: np.ndarray, sequences):
        self.mass: dict = defaultdict(float)
        self.ended: dict = defaultdict(float)
        self.without = 0.0
        for t, seq in enumerate(sequences):
            pt = float(p[t])
            if not seq:
                self.without += pt
                continue
            for n in range(1, len(seq) + 1):
                self.mass[seq[:n]] += pt
            self.ended[seq] += pt
        self.empty = type(sequences[0])() if sequences else b""
        self.mass[self.empty] = float(sum(pt for t, pt in enumerate(p) if sequences[t]))

    def conditional(self, prefix, n_symbols: int, make, drop_end: bool = False) -> np.ndarray:
        """The (n_symbols + 1)-way conditional after `prefix` (n_symbols-way with drop_end)."""
        den = self.mass.get(prefix, 0.0)
        kids = [self.mass.get(prefix + make(s), 0.0) for s in range(n_symbols)]
        if drop_end:
            cont = sum(kids)
            return np.array([log_ratio(k, cont) for k in kids])
        return np.array([log_ratio(k, den) for k in kids] + [log_ratio(self.ended.get(prefix, 0.0), den)])


def byte_sequences(vocab) -> list[bytes]:
    return [vocab.token_bytes(t) or b"" for t in range(len(vocab))]


def byte_masses(p: np.ndarray, vocab) -> SequenceMasses:
    return SequenceMasses(p, byte_sequences(vocab))


def next_byte(p: np.ndarray, vocab) -> np.ndarray:
    """[257]: log mass of tokens starting with each byte; column 256: tokens without bytes."""
    out = np.zeros(257)
    for t in range(len(vocab)):
        b = vocab.token_bytes(t)
        out[b[0] if b else 256] += p[t]
    return np.array([log(m) for m in out])


def byte_conditional(masses: SequenceMasses, prefix: bytes, drop_end: bool = False) -> np.ndarray:
    return masses.conditional(prefix, 256, lambda s: bytes([s]), drop_end)


def dec_sequences(amap) -> list[tuple]:
    return [tuple(amap.dec(t)) for t in range(amap.n_teacher)]


def student_target_of_no_bytes(amap, teacher, student) -> dict[int, int]:
    """Teacher ids without bytes -> student column: for a special, the student special of the same
    role (bos, eos, pad, unk); a special of no such role goes to the student special with the same
    text; everything else to V_s (the end column)."""
    by_text: dict[str, int] = {}
    for i in sorted(student.specials):
        by_text.setdefault(student.special_text.get(i, ""), i)
    out = {}
    for t in range(len(teacher)):
        if teacher.token_bytes(t) is not None:
            continue
        role = teacher.specials.get(t)
        s = None
        if role in ROLES_WITH_TARGET:
            s = student.special_ids.get(role)
        elif role is not None:
            s = by_text.get(teacher.special_text.get(t, ""))
        out[t] = amap.n_student if s is None else s
    return out


def project_to_student(p: np.ndarray, amap, teacher, student, decs: list[tuple]) -> np.ndarray:
    """[V_s + 1]: q(s) = sum over t with dec_S(t)[0] = s of p(t); byte-less teacher ids as in
    student_target_of_no_bytes."""
    q = np.zeros(amap.n_student + 1)
    no_bytes = student_target_of_no_bytes(amap, teacher, student)
    for t, d in enumerate(decs):
        q[d[0] if d else no_bytes.get(t, amap.n_student)] += p[t]
    return np.array([log(m) for m in q])


def dec_masses(p: np.ndarray, decs: list[tuple]) -> SequenceMasses:
    return SequenceMasses(p, decs)


def project_within(masses: SequenceMasses, consumed: tuple, n_student: int) -> np.ndarray:
    return masses.conditional(tuple(consumed), n_student, lambda s: (s,))


def cover(masses: SequenceMasses, student) -> np.ndarray:
    """[V_s]: log mass of the teacher tokens whose bytes start with bytes(s) (-inf without bytes)."""
    out = np.full(len(student), NEG_INF)
    for s in range(len(student)):
        b = student.token_bytes(s)
        if b:
            out[s] = log(masses.mass.get(b, 0.0))
    return out
