"""The ``ops_sparse`` format of the fuzz campaign (tests/fuzz/campaign.py): the sparse-row (``TopK``)
kernels at any log-probability.

A trial builds ``TopK`` teacher rows over the campaign's genuine map (botchan BPE -> botchan Unigram):
distinct ids, log-probabilities drawn from ordinary rows, from extreme ones (down to -1e30, down to
float32's smallest normal and its largest finite negative), with ``-inf`` entries, ties, and rows of one
kept entry; in float32, bfloat16, float16 or float64, at several temperatures. Each op of
:mod:`ctalign.ops` that takes ``TopK`` rows (``next_byte_logprobs``, ``project_to_student`` dense and
``sparse=True``, ``cover_logmass`` dense and sparse, ``byte_conditional_logprobs``,
``project_to_student_within``) runs on the compiled CPU kernels and, as the oracle, on the pure-torch
reference path in float64. The outputs must agree where the reference is above -30 (to 1e-3, 2e-2 in
16-bit types), be ``-inf`` only where the reference is below -60, and never be NaN. Rows that are not
valid (NaN, +inf, only ``-inf``) must raise ``NonFiniteLogitsError`` on both paths.
"""
from __future__ import annotations

import random
from functools import lru_cache

_EXTREMES = (-1e30, -1e10, -1e4, -745.0, -104.0, -88.0, -1e-30, -3.4e38, -1.2e-38)


def _pick(rng, xs):
    return xs[rng.randrange(len(xs))]


def _rows(rng: random.Random, n: int, k: int, V: int, torch):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    idx = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(n)])
    kind = rng.randrange(6)
    if kind == 0:  # ordinary: a log-softmax restricted to k ids
        lp = torch.log_softmax(torch.randn(n, V, generator=gen, dtype=torch.float64) * rng.choice([1, 5, 30]), -1)
        lp = lp.gather(1, idx)
    elif kind == 1:  # extreme values
        lp = torch.tensor([[_pick(rng, _EXTREMES) for _ in range(k)] for _ in range(n)], dtype=torch.float64)
        lp[:, 0] = _pick(rng, [-0.01, -1.0, -1e-30, -50.0])
    elif kind == 2:  # -inf entries beside a few finite ones
        lp = -torch.rand(n, k, generator=gen, dtype=torch.float64) * rng.choice([1.0, 100.0, 1e6])
        lp[torch.rand(n, k, generator=gen) < 0.6] = float("-inf")
        lp[:, rng.randrange(k)] = -rng.random()
    elif kind == 3:  # ties
        lp = torch.full((n, k), _pick(rng, [-1.0, -50.0, -1e5, -3e38]), dtype=torch.float64)
    elif kind == 4:  # wide spread
        lp = -torch.rand(n, k, generator=gen, dtype=torch.float64).pow(4) * 10.0 ** rng.randint(2, 38)
    else:  # not valid: NaN, +inf, or a row of only -inf (both paths must refuse it)
        lp = torch.log_softmax(torch.randn(n, k, generator=gen, dtype=torch.float64), -1)
        r = rng.randrange(n)
        if rng.random() < 0.3:
            lp[r] = float("-inf")
        else:
            lp[r, rng.randrange(k)] = _pick(rng, [float("nan"), float("inf")])
    return idx, lp


def trial_ops_sparse(rng: random.Random, workdir, *, genuine_map, clear) -> tuple[str, str]:
    import torch

    from ctalign import ops
    from ctalign.errors import NonFiniteLogitsError
    amap = genuine_map()
    V = amap.n_teacher
    n, k = rng.randint(1, 4), rng.choice([1, 2, 8, 64, 300])
    idx, lp = _rows(rng, n, min(k, V), V, torch)
    dtype = _pick(rng, [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    T = _pick(rng, [1.0, 1.0, 0.5, 2.0, 1e-3, 100.0])
    lp_t = lp.to(dtype)
    which = rng.randrange(7)
    node_rows = torch.randint(0, n, (3,), generator=torch.Generator().manual_seed(rng.randrange(2**31)))

    def call(x):
        rows = ops.TopK(idx, x)
        if which == 0:
            return ops.next_byte_logprobs(rows, amap, temperature=T)
        if which == 1:
            return ops.project_to_student(rows, amap, temperature=T)
        if which == 2:
            return _dense(ops.project_to_student(rows, amap, temperature=T, sparse=True), amap.n_student + 1, torch)
        if which == 3:
            return ops.cover_logmass(rows, amap, temperature=T)
        if which == 4:
            return _dense(ops.cover_logmass(rows, amap, temperature=T, sparse=True), amap.n_student, torch)
        if which == 5:
            trie = _teacher_vocab().trie
            prefixes = torch.tensor([trie.lookup(b"t"), 0, trie.lookup(b" th")])
            return ops.byte_conditional_logprobs(rows, amap, node_rows, prefixes, temperature=T)
        consumed = torch.zeros(3, dtype=torch.long)
        return ops.project_to_student_within(rows, amap, node_rows, consumed, temperature=T)

    outcome = []
    for name, x in (("compiled", lp_t), ("reference", lp_t.to(torch.float64))):
        try:
            if name == "reference":
                with ops.force_backend("reference"):
                    outcome.append(call(x).to(torch.float64))
            else:
                outcome.append(call(x).to(torch.float64))
        except NonFiniteLogitsError as e:
            outcome.append(e)
        except Exception as e:  # noqa: BLE001
            return ("clear_error" if clear(e, None) else "unclear_error"), f"{name} op {which}: {type(e).__name__}: " \
                                                                       f"{str(e)[:140]}"
    got, want = outcome
    if isinstance(got, Exception) or isinstance(want, Exception):
        if isinstance(got, Exception) and isinstance(want, Exception):
            return "clear_error", "both paths refuse the rows"
        return "silent_wrong", f"op {which}: one path refuses, the other does not ({got!r:.80} / {want!r:.80})"
    if torch.isnan(got).any():
        return "silent_wrong", f"op {which}: NaN (dtype {dtype}, T {T})"
    sig = want > -30
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    err = (got - want).abs()[sig]
    if err.numel() and err.max().item() > tol:
        return "silent_wrong", f"op {which} off by {err.max().item():.3g} (dtype {dtype}, T {T}, k {k})"
    if (torch.isinf(got) & (want > -60)).any():
        return "silent_wrong", f"op {which}: -inf where the reference is finite (dtype {dtype}, T {T})"
    return "ok", ""


@lru_cache(maxsize=1)
def _teacher_vocab():
    from ctalign import assets
    from ctalign.vocab import load_vocab
    return load_vocab(assets.path("botchan-bpe"))  # the genuine map's teacher


def _dense(rows, width: int, torch):
    """Sparse TopK output scattered into a dense row of -inf (the ops' own layout)."""
    out = torch.full((*rows.indices.shape[:-1], width), float("-inf"), dtype=torch.float64)
    return out.scatter(-1, rows.indices.long(), rows.logprobs.to(torch.float64))
