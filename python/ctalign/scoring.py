"""Lossless cross-tokenizer scoring: the teacher's likelihood of a text under the student's
tokenization, by enumerating covers (``docs/design.md``; issue #15), for evaluation.

    >>> res = lossless_logprobs(teacher_fn, amap, "some text")          # doctest: +SKIP
    >>> res.logprobs        # log P(s_j | s_<j) per student token, float64            # doctest: +SKIP
    >>> res.nats_per_byte                                                              # doctest: +SKIP

``teacher_fn(sequences) -> logits [N, W]``: any callable that returns, for a batch of teacher token
sequences (lists of ids), the teacher's next-token logits after each (``W >= len(teacher vocab)``;
see :func:`model_teacher` for a causal LM). Everything is computed in float64.

Definitions. A teacher vocabulary spells text in *units*: bytes (``units="bytes"``), or student
ids through ``dec_S`` (``units="student"``, the subset and identical regimes, where the student
tokenizes a text as the concatenation of ``dec_S`` over the teacher's tokens). A *cover* of the unit
prefix ``x[:m]`` is a teacher token sequence ``u_1 .. u_n`` whose units before the last spell
``x[:l]`` with ``l < m`` and whose last token's units start with ``x[l:m]``;
``P(x[:m]) = sum over covers of p(u_1 .. u_n)``: the teacher's probability of producing a text
that starts with ``x[:m]`` (every token sequence counts, canonical or not). The score of student
token ``j`` is ``log P(x[:e_j]) - log P(x[:e_{j-1}])`` (``e_j``: where token j ends), so the scores
of a text add up to ``log P(text...)``; for ``units="student"`` they are the exact next-student-token
conditionals that :func:`ctalign.losses.likelihood_targets` approximates from one forward pass.

Enumeration: breadth first over the teacher prefixes that spell ``x[:l]`` exactly (one teacher row
each, asked of ``teacher_fn`` in batches of ``batch_size``). Their number grows with the number of
ways the teacher's vocabulary spells the text; ``prune`` (nats) drops a prefix whose probability is
that far below the best prefix spelling the same ``x[:l]`` (then it is no longer lossless; the
result counts what was dropped). ``prune=None``: lossless.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["ScoreResult", "lossless_logprobs", "fast_logprobs", "model_teacher"]


@dataclass
class ScoreResult:
    logprobs: np.ndarray          # [n] log P(s_j | s_<j) of each student token (float64)
    prefix_logprob: np.ndarray    # [n + 1] log P(x[:e_j]), e_0 = 0
    n_bytes: int                  # text bytes scored
    teacher_rows: int = 0         # teacher rows evaluated
    prefixes: int = 0             # teacher prefixes enumerated
    pruned: int = 0               # prefixes dropped by prune
    units: str = "bytes"
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def nats_per_byte(self) -> float:
        return -self.total / max(self.n_bytes, 1)


class _Spelling:
    """A trie over the teacher's unit sequences: lookup(units) -> node, the ids ending there and the
    ids whose sequence starts with them (as ranges of the trie's order)."""

    def __init__(self, trie):
        self.trie = trie
        self.order = np.asarray(trie.order)
        self.lo, self.end, self.hi = (np.asarray(getattr(trie, f)) for f in ("node_lo", "node_end", "node_hi"))
        self.maxlen = int(np.asarray(trie.node_depth).max()) if len(self.lo) else 0
        self._cache: dict = {}

    def node(self, units: tuple) -> int:
        n = self._cache.get(units)
        if n is None:
            n = self._cache[units] = int(self.trie.lookup(bytes(units) if self.is_bytes else list(units)))
        return n

    is_bytes = True

    def ended(self, units: tuple) -> np.ndarray:
        n = self.node(units)
        return self.order[self.lo[n]:self.end[n]] if n > 0 else self.order[:0]

    def starting(self, units: tuple) -> np.ndarray:
        n = self.node(units)
        return self.order[self.lo[n]:self.hi[n]] if n > 0 else self.order[:0]


def _units_of(amap, teacher_vocab, student_vocab, units: str):
    if units == "bytes":
        sp = _Spelling(teacher_vocab.trie)
        sp.is_bytes = True
    else:
        sp = _Spelling(amap.dec_trie)
        sp.is_bytes = False
    return sp


def _student_side(student_vocab, text, student_ids):
    from ctalign.align import token_spans
    ids = list(student_vocab.encode(text)) if student_ids is None else [int(i) for i in student_ids]
    start, end, _ = token_spans(student_vocab, [ids], None, [text])
    return ids, [int(e) for e in end[0, :len(ids)]]


def lossless_logprobs(teacher_fn: Callable[[list[list[int]]], Any], amap, text: str, *, student_ids=None,
                      context: Sequence[int] | None = None, units: str = "auto", batch_size: int = 64,
                      prune: float | None = None, temperature: float = 1.0) -> ScoreResult:
    """The teacher's log-likelihood of ``text`` under the student's tokenization, per student token,
    summed over every cover (module docstring).

    ``amap``: the :class:`~ctalign.AlignmentMap`. ``student_ids``: the student's tokens of the text
    (default ``student.encode(text)``; no specials). ``context``: teacher ids before the text (default
    the teacher's bos, if it has one). ``units``: ``"student"`` (covers in student ids through
    ``dec_S``; the subset and identical regimes), ``"bytes"`` (covers of byte prefixes; any regime),
    ``"auto"``: ``student`` in the subset and identical regimes, else ``bytes``."""
    import torch
    tv, sv = amap.teacher, amap.student
    if tv is None or sv is None:
        raise ValueError("lossless_logprobs needs a map with both vocabularies attached")
    regime = getattr(amap, "regime", None)
    if units == "auto":
        units = "student" if regime in ("subset", "identical") else "bytes"
    if units not in ("student", "bytes"):
        raise ValueError(f"units must be 'student', 'bytes' or 'auto', got {units!r}")
    if context is None:
        bos = tv.special_ids.get("bos")
        context = [] if bos is None else [bos]
    context = [int(c) for c in context]
    s_ids, s_end = _student_side(sv, text, student_ids)
    if units == "student":
        if regime not in ("subset", "identical"):
            raise ValueError(f"units='student' needs the subset or identical regime (dec_S is the student's "
                             f"tokenization there); this map is {regime!r}: use units='bytes'")
        if any(sv.token_bytes(i) is None for i in s_ids):
            raise ValueError("units='student' scores student tokens with bytes only (no specials)")
        x = tuple(s_ids)
        ends = list(range(1, len(s_ids) + 1))
    else:
        raw = text.encode("utf-8")
        x = tuple(raw)
        ends = s_end
    spell = _units_of(amap, tv, sv, units)
    n_t = amap.n_teacher
    queries = sorted(set(e for e in ends if e > 0))
    mass = {m: 0.0 for m in queries}
    last = queries[-1] if queries else 0
    # frontier: prefixes spelling x[:l] exactly -> their log-probability (prefix ids are a tuple)
    frontier: dict[int, dict[tuple, float]] = {0: {(): 0.0}}
    rows_asked = n_prefixes = n_pruned = 0
    for l in range(0, last):
        states = frontier.pop(l, None)
        if not states:
            continue
        if prune is not None and len(states) > 1:
            best = max(states.values())
            kept = {k: v for k, v in states.items() if v >= best - prune}
            n_pruned += len(states) - len(kept)
            states = kept
        n_prefixes += len(states)
        items = list(states.items())
        for lo in range(0, len(items), batch_size):
            chunk = items[lo:lo + batch_size]
            logits = teacher_fn([context + list(pre) for pre, _ in chunk])
            logits = torch.as_tensor(logits)[:, :n_t].double()
            lp = torch.log_softmax(logits / temperature, -1).cpu().numpy()
            rows_asked += len(chunk)
            for (pre, lpre), row in zip(chunk, lp):
                w = np.exp(lpre)
                for m in queries:
                    if m <= l:
                        continue
                    if m - l > spell.maxlen:
                        break
                    ids = spell.starting(x[l:m])
                    if len(ids):
                        mass[m] += w * float(np.exp(row[ids]).sum())
                for l2 in range(l + 1, min(last, l + spell.maxlen) + 1):
                    if l2 >= last:
                        break
                    ids = spell.ended(x[l:l2])
                    for t in ids:
                        v = lpre + float(row[t])
                        if v > -np.inf:
                            d = frontier.setdefault(l2, {})
                            d[pre + (int(t),)] = v
    prefix = np.array([0.0] + [np.log(mass[e]) if mass.get(e, 0.0) > 0 else -np.inf for e in ends])
    return ScoreResult(np.diff(prefix), prefix, len(text.encode("utf-8")), rows_asked, n_prefixes, n_pruned, units)


def fast_logprobs(teacher_fn, amap, text: str, *, student_ids=None, context: Sequence[int] | None = None,
                  targets: str = "exact", temperature: float = 1.0) -> ScoreResult:
    """The same per-token score from the one-forward-pass likelihood targets
    (:func:`ctalign.losses.likelihood_targets` of kind ``targets``, each row without its ``end``
    column, renormalised, as the KL uses it): ``log q_j(s_j)``. The teacher rows are those of the
    teacher's own tokenization (``len(teacher tokens)`` rows; no other evaluation)."""
    import torch
    from ctalign.align import align
    from ctalign.losses import likelihood_targets
    tv, sv = amap.teacher, amap.student
    if context is None:
        bos = tv.special_ids.get("bos")
        context = [] if bos is None else [bos]
    context = [int(c) for c in context]
    s_ids = list(sv.encode(text)) if student_ids is None else [int(i) for i in student_ids]
    t_ids = context + list(tv.encode(text))
    s_ctx = [sv.special_ids[r] for r in ("bos",) if context and r in sv.special_ids][:1]
    if context and not s_ctx:
        raise ValueError("fast_logprobs: the teacher context has a bos the student lacks")
    s_row = s_ctx + s_ids
    a = align([t_ids], [s_row], amap=amap, texts=[text])
    logits = torch.as_tensor(teacher_fn([t_ids[:k + 1] for k in range(len(t_ids))]))[None].double()
    tg = likelihood_targets(logits, amap, a, targets=targets, temperature=temperature)
    lp = tg.logprobs[0, :, :amap.n_student]
    lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    off = len(s_ctx)
    vals = np.array([float(lp[off + j, s_ids[j]]) if bool(tg.valid[0, off + j]) else np.nan
                     for j in range(len(s_ids))])
    prefix = np.concatenate([[0.0], np.cumsum(vals)])
    return ScoreResult(vals, prefix, len(text.encode("utf-8")), len(t_ids), len(t_ids), 0, f"fast-{targets}",
                       extra={"exact": tg.exact[0, off:off + len(s_ids)].numpy()})


def model_teacher(model, *, device=None, pad_id: int = 0) -> Callable[[list[list[int]]], Any]:
    """A ``teacher_fn`` from a causal LM (``model(input_ids, attention_mask).logits``): right-padded
    batches, the logits at each sequence's last position (float32, on the CPU)."""
    import torch

    @torch.no_grad()
    def fn(sequences):
        n = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), n), pad_id, dtype=torch.long)
        att = torch.zeros((len(sequences), n), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.as_tensor(s)
            att[i, :len(s)] = 1
        dev = device or next(model.parameters()).device
        out = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits
        last = att.sum(1) - 1
        return out[torch.arange(len(sequences)), last.to(dev)].float().cpu()

    return fn
