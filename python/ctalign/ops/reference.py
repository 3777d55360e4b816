"""Pure-torch reference of the projection kernels: any device, autograd by torch itself.

These functions have the signatures of the compiled backends (``docs/ARCHITECTURE.md``, "Kernel
backends"), so :mod:`ctalign.ops` can serve any tensor on any device with them, and the tests compare
the compiled kernels against them. Each is also a good pure-torch formulation (vectorised, no Python
loop over the vocabulary): a softmax, then ``index_add``/``scatter_add`` for groups and a ``cumsum``
over the trie's sorted order for ranges.

Numerics: ``x / T``, the softmax and every sum in float64 (``accumulate=torch.float32`` gives the
fastest formulation instead: float32 softmax and sums, for benchmarks and large CUDA fallbacks).
A range whose prefix-sum difference is below 2^-23 of its prefix is re-summed directly, as in the
kernels, so small masses keep their relative precision. Zero mass gives ``-inf`` (and no gradient);
nothing here produces NaN for finite input. Outputs are float32 (float64 for float64 logits).

Sparse rows (:func:`topk_grouped_logmass`, :func:`topk_range_logmass`) take the ``k`` kept entries
of each row as ``(indices, logprobs)`` and cost O(k log k) per row plus the output size. Their
log-probabilities are used as given: the missing tail is not renormalised, so a row's outputs sum to
the kept mass. A temperature ``T`` reshapes the kept entries while keeping their total mass:
``lp_T = lp / T - logsumexp(lp / T) + logsumexp(lp)``, which equals the dense path when ``k`` covers
the vocabulary.
"""
from __future__ import annotations

import torch

__all__ = [
    "available", "grouped_logmass", "range_logmass", "topk_grouped_logmass", "topk_grouped_sparse",
    "topk_range_logmass", "topk_logprobs", "sorted_l1_distance",
    "safe_log", "tempered_logprobs", "DIRECT_SUM_BELOW",
]

#: A range mass below this share of its prefix sum is summed directly (kernels use the same rule).
DIRECT_SUM_BELOW = 2.0 ** -23


def available() -> bool:
    """Always True: the reference runs wherever torch does."""
    return True


def safe_log(mass: torch.Tensor) -> torch.Tensor:
    """log(mass) with exactly -inf where mass <= 0, and no NaN in the gradient there."""
    positive = mass > 0
    return torch.where(positive, torch.where(positive, mass, torch.ones_like(mass)).log(),
                       torch.full_like(mass, float("-inf")))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(logits: torch.Tensor, vocab_size: int, temperature: float, accumulate: torch.dtype) -> torch.Tensor:
    """x / T in float64 when accumulating in float64 (exact for any input dtype), else float32."""
    dtype = torch.float64 if accumulate == torch.float64 else _compute_dtype(logits.dtype)
    x = logits[:, :vocab_size].to(dtype)
    return x / temperature if temperature != 1.0 else x


def _probabilities(x: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """softmax(x) in `accumulate`; in float64 through log_softmax, so tiny probabilities survive."""
    if accumulate == torch.float64:
        return torch.log_softmax(x, dim=-1).to(torch.float64).exp()
    return torch.softmax(x, dim=-1).to(accumulate)


def grouped_logmass(logits: torch.Tensor, vocab_size: int, group: torch.Tensor, n_groups: int,
                    temperature: float = 1.0, *, accumulate: torch.dtype = torch.float64):
    """``(out [N, G], lse [N])``: ``out[r, g] = log sum_{group[t] = g} softmax(x_r / T)[t]``."""
    x = _scaled(logits, vocab_size, temperature, accumulate)
    out_dtype = _compute_dtype(logits.dtype)
    lse = torch.logsumexp(x, dim=-1)
    p = _probabilities(x, accumulate)
    mass = torch.zeros(x.shape[0], n_groups, dtype=accumulate, device=x.device)
    mass = mass.scatter_add(1, group.to(x.device, torch.int64).expand(x.shape[0], -1), p)
    return safe_log(mass).to(out_dtype), lse.to(out_dtype)


def _range_sums(values: torch.Tensor, row_of_query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Sums of ``values[row_of_query[q], lo[q, c]:hi[q, c]]`` (float64 [Q, C]): prefix differences,
    re-summed directly where the difference is below DIRECT_SUM_BELOW of its prefix."""
    n_rows = values.shape[0]
    prefix = torch.cat([values.new_zeros(n_rows, 1), values.cumsum(dim=-1)], dim=-1)
    q = row_of_query[:, None]
    s_lo, s_hi = prefix[q, lo], prefix[q, hi]
    mass = s_hi - s_lo
    small = (hi > lo) & (mass < DIRECT_SUM_BELOW * s_hi)
    if bool(small.any()):
        qi, ci = small.nonzero(as_tuple=True)
        a, b = lo[qi, ci], hi[qi, ci]
        lengths = b - a
        segment = torch.repeat_interleave(torch.arange(len(a), device=values.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        position = a[segment] + torch.arange(segment.numel(), device=values.device) - starts[segment]
        direct = values.new_zeros(len(a)).index_add(0, segment, values[row_of_query[qi][segment], position])
        mass = mass.index_put((qi, ci), direct)
    return mass


def range_logmass(logits: torch.Tensor, vocab_size: int, order: torch.Tensor, rows: torch.Tensor | None,
                  lo: torch.Tensor, hi: torch.Tensor, temperature: float = 1.0,
                  *, accumulate: torch.dtype = torch.float64):
    """``(out [Q, C], lse [N])``: ``out[q, c] = log sum_{i in [lo, hi)} softmax(x_{rows q} / T)[order[i]]``.

    ``rows`` None means one query per row; ``lo``/``hi`` are ``[Q, C]`` or ``[1, C]`` (shared).
    Only the rows some query reads are exponentiated."""
    x = _scaled(logits, vocab_size, temperature, accumulate)
    out_dtype = _compute_dtype(logits.dtype)
    device = x.device
    lse = torch.logsumexp(x, dim=-1)
    if rows is None:
        rows = torch.arange(x.shape[0], device=device)
    rows = rows.to(device, torch.int64)
    used, row_of_query = torch.unique(rows, return_inverse=True)
    p = _probabilities(x[used], accumulate)
    in_order = p[:, order.to(device, torch.int64)]
    n_queries = rows.shape[0]
    lo = lo.to(device, torch.int64).expand(n_queries, -1)
    hi = hi.to(device, torch.int64).expand(n_queries, -1)
    mass = _range_sums(in_order, row_of_query, lo, hi)
    return safe_log(mass).to(out_dtype), lse.to(out_dtype)


def topk_logprobs(logits: torch.Tensor, vocab_size: int, rows: torch.Tensor | None, k: int, temperature: float = 1.0,
                  *, accumulate: torch.dtype = torch.float64):
    """``(ids [Q, k], logprobs [Q, k], lse [Q])``: the k largest of ``x_r[:vocab_size]`` for each row r
    of ``rows`` (all rows when None) in decreasing order, ties broken by the smaller id (the compiled
    kernel's rule, so both give the same ids), and ``log softmax(x_r / T)`` there. Differentiable in
    ``logits`` through torch."""
    if rows is not None:
        logits = logits.index_select(0, rows.to(logits.device))
    x = logits[:, :vocab_size].to(_compute_dtype(logits.dtype))  # exact for every input dtype
    vals, idx = torch.topk(x, k, dim=-1)  # the right values; ids among ties at the k-th value: any
    kth = vals[:, -1:]
    n_above = (vals > kth).sum(-1, keepdim=True)  # all of them are in idx
    above_first = idx.gather(1, torch.argsort((vals <= kth).to(torch.int8), dim=-1, stable=True))
    # the smallest ids equal to the k-th value: the largest -id among them (float32 holds ids < 2^24 exactly)
    neg_id = -torch.arange(vocab_size, device=x.device, dtype=torch.float32)
    ties = torch.topk(torch.where(x == kth, neg_id, float("-inf")), k, dim=-1).indices
    j = torch.arange(k, device=x.device)
    ids = torch.where(j < n_above, above_first, ties.gather(1, (j - n_above).clamp_min(0)))
    ids = ids.sort(-1).values  # then by value, stable: ties in increasing id order
    ids = ids.gather(1, torch.sort(x.gather(1, ids), dim=-1, descending=True, stable=True).indices)
    s = _scaled(logits, vocab_size, temperature, accumulate)
    # relative to the row max (as log_softmax does): s - lse directly loses the top tokens' log-probabilities
    # to rounding once |x / T| outgrows 2^53 (a float64 ulp of 1.7e13 at 1e29)
    top = s.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    rel = torch.logsumexp(s - top, dim=-1)
    lse = rel + top[:, 0]
    out_dtype = _compute_dtype(logits.dtype)
    return ids, ((s.gather(1, ids) - top) - rel[:, None]).to(out_dtype), lse.to(out_dtype)


def tempered_logprobs(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Kept log-probabilities at temperature T with their total mass unchanged (see module doc)."""
    if temperature == 1.0:
        return logprobs
    scaled = logprobs / temperature
    kept = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    finite = torch.isfinite(kept)
    shifted = scaled - torch.where(finite, norm, torch.zeros_like(norm)) + torch.where(finite, kept, torch.zeros_like(kept))
    return torch.where(finite, shifted, torch.full_like(scaled, float("-inf")))


def _topk_probs(logprobs: torch.Tensor, temperature: float):
    lp = tempered_logprobs(logprobs.to(torch.float64), temperature)
    return lp.exp(), _compute_dtype(logprobs.dtype)


def topk_grouped_logmass(indices: torch.Tensor, logprobs: torch.Tensor, group: torch.Tensor, n_groups: int,
                         temperature: float = 1.0) -> torch.Tensor:
    """``out [N, G]`` from the kept entries of each row: ``log sum_{j: group[indices j] = g} p_j``."""
    p, out_dtype = _topk_probs(logprobs, temperature)
    g = group.to(indices.device, torch.int64)[indices]
    mass = torch.zeros(p.shape[0], n_groups, dtype=torch.float64, device=p.device).scatter_add(1, g, p)
    return safe_log(mass).to(out_dtype)


def topk_grouped_sparse(indices: torch.Tensor, logprobs: torch.Tensor, group: torch.Tensor, n_groups: int,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups of the kept entries and their log masses, sparse: ``(ids [N, w], logmass [N, w])``
    with ``w = min(k, n_groups)``. A row's u groups (those of its k entries, ``-inf`` entries included)
    come first in increasing id order, then ``w - u`` padding ids (the smallest ids outside the row's
    groups, so ids stay distinct) with log mass -inf; the compiled kernel keeps the same order. Equal, once scattered into ``[N, n_groups]``, to
    :func:`topk_grouped_logmass`; O(k log k) per row, never O(n_groups)."""
    p, out_dtype = _topk_probs(logprobs, temperature)
    n_rows, k = indices.shape
    device = indices.device
    width = min(k, n_groups)
    if n_rows == 0 or width == 0:
        return (torch.zeros(n_rows, width, dtype=torch.int64, device=device),
                torch.zeros(n_rows, width, dtype=out_dtype, device=device))
    g = group.to(device, torch.int64)[indices]
    g_sorted, perm = torch.sort(g, dim=-1)
    p_sorted = p.gather(-1, perm)
    first = torch.ones_like(g_sorted, dtype=torch.bool)
    first[:, 1:] = g_sorted[:, 1:] != g_sorted[:, :-1]
    segment = torch.cumsum(first, dim=-1) - 1  # slot of each entry's group, groups in id order
    n_used = first.sum(dim=-1, keepdim=True)
    mass = torch.zeros(n_rows, k, dtype=p.dtype, device=device).scatter_add(1, segment, p_sorted)
    ids = torch.zeros(n_rows, k, dtype=torch.int64, device=device).scatter(1, segment, g_sorted)
    # Padding ids: the smallest ids outside the row's groups (among the first min(2k, n_groups) ids,
    # of which at most u are taken, so enough are free).
    candidates = torch.arange(min(2 * k, n_groups), device=device).expand(n_rows, -1).contiguous()
    at = torch.searchsorted(g_sorted, candidates).clamp(max=k - 1)
    free = g_sorted.gather(-1, at) != candidates
    rank = torch.cumsum(free, dim=-1) - 1
    take = free & (rank < width - n_used)
    slot = torch.where(take, n_used + rank, torch.full_like(rank, k))
    ids = torch.cat([ids, torch.zeros(n_rows, 1, dtype=torch.int64, device=device)], dim=1)
    ids = ids.scatter(1, slot, candidates)[:, :width]
    used = torch.arange(width, device=device) < n_used
    logmass = torch.where(used, safe_log(mass[:, :width]), torch.full_like(mass[:, :width], float("-inf")))
    return ids, logmass.to(out_dtype)


def topk_range_logmass(indices: torch.Tensor, logprobs: torch.Tensor, rank: torch.Tensor, order_size: int,
                       rows: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """``out [Q, C]`` from the kept entries: the mass of entries whose ``rank`` (position in the sorted
    order, -1 for tokens outside it) lies in ``[lo, hi)``. Entries are sorted by rank per row, summed
    with a cumsum, and ranges located with ``searchsorted``: O(k log k) per row plus O(C log k) per query."""
    p, out_dtype = _topk_probs(logprobs, temperature)
    device = p.device
    r = rank.to(device, torch.int64)[indices]
    r = torch.where(r < 0, torch.full_like(r, order_size), r)  # outside every range
    r_sorted, perm = torch.sort(r, dim=-1)
    p_sorted = p.gather(-1, perm)
    if rows is None:
        rows = torch.arange(p.shape[0], device=device)
    rows = rows.to(device, torch.int64)
    n_queries = rows.shape[0]
    lo = lo.to(device, torch.int64).expand(n_queries, -1).contiguous()
    hi = hi.to(device, torch.int64).expand(n_queries, -1).contiguous()
    keys = r_sorted[rows]
    a = torch.searchsorted(keys, lo)
    b = torch.searchsorted(keys, hi)
    mass = _range_sums(p_sorted, rows, a, b)
    return safe_log(mass).to(out_dtype)


def sorted_l1_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ULD's exact distance per row: ``sum_i |s_(i) - t_(i)|`` of the student's ``[N, V_s]`` and the
    teacher's ``[N, V_t]`` probabilities, each sorted in decreasing order, the shorter padded with zeros
    (differentiable through ``torch.sort``; the compiled kernel's definition)."""
    a = torch.sort(student, -1, descending=True).values
    b = torch.sort(teacher, -1, descending=True).values
    n = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, n - a.shape[-1]))
    b = torch.nn.functional.pad(b, (0, n - b.shape[-1]))
    return (a - b).abs().sum(-1)
