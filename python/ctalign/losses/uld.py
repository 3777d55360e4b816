"""ULD (Boizard et al., 2024): the sorted-probability distance between the student and teacher
next-token distributions, over aligned token pairs (positional or byte-aligned).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctalign.losses._common import (_rows_device, _ops, _check_reduction, _check_temperature, _check_logits,
                                    _check_ids, _fit, _token_mask, _check_alignment_ids, _alignment_lengths,
                                    _check_target_ids, _shifted_ce, _Terms, _teacher_rows, _is_topk,
                                    _select_rows)


def _pairs_positional(s_target: torch.Tensor, t_target: torch.Tensor):
    """(b, j) and (b, k) of the i-th target token of each side, i < min(counts) per row."""
    sb, sj = torch.nonzero(s_target, as_tuple=True)
    tb, tk = torch.nonzero(t_target, as_tuple=True)
    ns = s_target.sum(1)
    nt = t_target.sum(1)
    n = torch.minimum(ns, nt)
    s_rank = torch.cumsum(s_target.long(), 1)[sb, sj] - 1
    t_rank = torch.cumsum(t_target.long(), 1)[tb, tk] - 1
    keep_s = s_rank < n[sb]
    keep_t = t_rank < n[tb]
    return (sb[keep_s], sj[keep_s]), (tb[keep_t], tk[keep_t])


def _rank_in_group(b: torch.Tensor, g: torch.Tensor, width: int) -> torch.Tensor:
    """Rank of each element among those with the same (b, g), in input order (input sorted by b, pos)."""
    if b.numel() == 0:
        return b.clone()
    key = b * (width + 1) + g
    order = torch.argsort(key, stable=True)
    ks = key[order]
    start = torch.ones_like(ks, dtype=torch.bool)
    start[1:] = ks[1:] != ks[:-1]
    idx = torch.arange(ks.numel(), device=ks.device)
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    rank_sorted = idx - first
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def _pairs_byte(s_target, t_target, s_chunk, t_chunk):
    """Pairs the i-th target token of each side inside the same chunk (the groups between common
    boundaries)."""
    s_ok = s_target & (s_chunk >= 0)
    t_ok = t_target & (t_chunk >= 0)
    sb, sj = torch.nonzero(s_ok, as_tuple=True)
    tb, tk = torch.nonzero(t_ok, as_tuple=True)
    sc = s_chunk[sb, sj]
    tc = t_chunk[tb, tk]
    C = int(max(sc.max().item() if sc.numel() else 0, tc.max().item() if tc.numel() else 0)) + 1
    sr = _rank_in_group(sb, sc, C)
    tr = _rank_in_group(tb, tc, C)
    R = int(max(sr.max().item() if sr.numel() else 0, tr.max().item() if tr.numel() else 0)) + 1
    s_key = (sb * C + sc) * R + sr
    t_key = (tb * C + tc) * R + tr
    common = torch.sort(s_key[torch.isin(s_key, t_key)]).values
    s_order = torch.argsort(s_key)
    t_order = torch.argsort(t_key)
    si = s_order[torch.searchsorted(s_key[s_order], common)]
    ti = t_order[torch.searchsorted(t_key[t_order], common)]
    return (sb[si], sj[si]), (tb[ti], tk[ti])


def _sorted_probs(x: torch.Tensor, k: int | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Descending probabilities of logits rows [N, V] (top k of them) and the tail mass."""
    p = torch.softmax(x.float() / temperature, -1)
    if k is None or k >= p.shape[-1]:
        return torch.sort(p, -1, descending=True).values, None
    top = torch.topk(p, k, -1, sorted=True).values
    return top, (1.0 - top.sum(-1)).clamp_min(0.0)


def _check_paired_rows(x: torch.Tensor, b: torch.Tensor, j: torch.Tensor, side: str, temperature: float,
                       length: int) -> None:
    """The compiled path's rule on the torch path: a paired row holding NaN or +inf, only -inf, or
    overflowing at the temperature raises (one max per row; skipped on CUDA with ops.check_finite off)."""
    if x.device.type == "cuda" and not _ops().check_finite:
        return
    bad = ~torch.isfinite(x.float().amax(-1) / temperature)
    if bool(bad.any()):
        from ctalign.errors import NonFiniteLogitsError
        i = int(bad.nonzero()[0])
        raise NonFiniteLogitsError(f"uld_loss: {side} logits at batch {int(b[i])}, position {int(j[i])} hold NaN or "
                                   f"+inf, only -inf, or overflow at temperature {temperature}",
                                   int(b[i]) * length + int(j[i]))


def _compiled_top_probs(logits: torch.Tensor, rows: torch.Tensor, k: int, vocab_size: int, temperature: float,
                        side: str, length: int) -> torch.Tensor:
    """Descending top-k probabilities of the given rows of logits [B, L, W] (flattened row ids), by the
    compiled ops.topk_logprobs; a non-finite row is reported by (batch, position) and side."""
    from ctalign.errors import NonFiniteLogitsError
    try:
        lp = _ops().topk_logprobs(logits, k, rows=rows, vocab_size=vocab_size, temperature=temperature).logprobs
    except NonFiniteLogitsError as e:
        b, j = divmod(e.row, length)
        raise NonFiniteLogitsError(f"uld_loss: {side} logits at batch {b}, position {j} hold NaN or +inf, only "
                                   f"-inf, or overflow at temperature {temperature}", e.row) from None
    return lp.float().exp()


def _sorted_topk_rows(rows, k: int | None, temperature: float):
    """Same as _sorted_probs for a TopK (sparse teacher rows, log-probs as given)."""
    from ctalign.ops.reference import tempered_logprobs
    lp = tempered_logprobs(rows.logprobs.float(), temperature)  # the kept mass stays as given, as in the ops
    p = lp.exp()
    kk = p.shape[-1] if k is None else min(k, p.shape[-1])
    top = torch.topk(p, kk, -1, sorted=True).values
    return top, (1.0 - top.sum(-1)).clamp_min(0.0)


def _uld_distance(ps: torch.Tensor, tail_s, pt: torch.Tensor, tail_t) -> torch.Tensor:
    n = max(ps.shape[-1], pt.shape[-1])
    if ps.shape[-1] < n:
        ps = F.pad(ps, (0, n - ps.shape[-1]))
    if pt.shape[-1] < n:
        pt = F.pad(pt, (0, n - pt.shape[-1]))
    d = (ps - pt).abs().sum(-1)
    if tail_s is not None or tail_t is not None:
        ts = tail_s if tail_s is not None else torch.zeros_like(d)
        tt = tail_t if tail_t is not None else torch.zeros_like(d)
        d = d + (ts - tt).abs()
    return d


class _Setup(NamedTuple):
    """What uld_loss and its fused form share: options, the teacher side and the paired positions."""
    temp_s: float
    temp_t: float
    top_k: int | None
    sparse_teacher: bool
    Vt: int | None
    Lt: int
    pairs: tuple  # ((sb, sj), (tb, tk)): student (batch, position) and teacher (batch, position) per pair
    ce_t: torch.Tensor
    ids: torch.Tensor  # the student ids, checked, on the student's device


def _setup(teacher_logits, student_ids, alignment, student_mask, teacher_mask, ce_mask, *, align, top_k, temperature,
           student_temperature, teacher_temperature, distance_mean, teacher_vocab_size, B, Ls, Vs, dev) -> _Setup:
    temperature = _check_temperature(temperature)
    temp_s = temperature if student_temperature is None else _check_temperature(student_temperature,
                                                                                "student_temperature")
    temp_t = temperature if teacher_temperature is None else _check_temperature(teacher_temperature,
                                                                                "teacher_temperature")
    if distance_mean not in ("pairs", "examples"):
        raise ValueError(f"distance_mean must be 'pairs' or 'examples', got {distance_mean!r}")
    if align not in ("positional", "byte"):
        raise ValueError(f"align must be 'positional' or 'byte', got {align!r}")
    if top_k is not None:
        top_k = int(top_k)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    sparse_teacher = _is_topk(teacher_logits)
    if sparse_teacher:
        B_t, Lt = teacher_logits.indices.shape[:2]
        Vt = None
    else:
        Vt = _check_logits(teacher_logits, "teacher logits", teacher_vocab_size)
        B_t, Lt = teacher_logits.shape[:2]
    if B_t != B:
        raise ValueError(f"teacher batch {B_t} != student batch {B}")
    s_t = _token_mask(student_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    t_t = _token_mask(teacher_mask, _alignment_lengths(alignment, "teacher"), (B, Lt), dev)
    if align == "byte":
        if alignment is None:
            raise ValueError("align='byte' needs the alignment (ctalign.align.align) of the two tokenizations")
        pairs = _pairs_byte(s_t, t_t, _fit(alignment.s_chunk.to(dev), Ls, -1), _fit(alignment.t_chunk.to(dev), Lt, -1))
    else:
        pairs = _pairs_positional(s_t, t_t)
    ce_t = s_t if ce_mask is None else _token_mask(ce_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(dev)
    _check_alignment_ids(alignment, ids, "student")
    return _Setup(temp_s, temp_t, top_k, sparse_teacher, Vt, int(Lt), pairs, ce_t, ids)


def _compiled_topk_applies(su: _Setup, Vs: int, student_side, teacher_logits) -> bool:
    """CPU: both sides' top k from the paired rows in place (no softmax, no gathered row copies)."""
    return (su.top_k is not None and su.top_k < Vs and (su.sparse_teacher or su.top_k < su.Vt)
            and _ops().uses_compiled_kernels(student_side)
            and (su.sparse_teacher or _ops().uses_compiled_kernels(teacher_logits)))


def _compiled_topk_distances(su: _Setup, student_side, s_rows, s_length, teacher_logits, t_rows, t_flat, Vs, dev):
    """Distances of the pairs whose student rows are ``s_rows`` of ``student_side`` (logits [B, L, W]),
    by the compiled top k of both sides."""
    ps = _compiled_top_probs(student_side, s_rows, su.top_k, Vs, su.temp_s, "student", s_length)
    if su.sparse_teacher:
        pt, tail_t = _sorted_topk_rows(_select_rows(t_rows, t_flat), su.top_k, su.temp_t)
    else:
        pt = _compiled_top_probs(teacher_logits.detach(), t_flat, su.top_k, su.Vt, su.temp_t, "teacher", su.Lt)
        tail_t = (1.0 - pt.sum(-1)).clamp_min(0.0)
    tail_s = (1.0 - ps.sum(-1)).clamp_min(0.0)
    return _uld_distance(ps, tail_s, pt.to(dev), tail_t.to(dev))


def _compiled_exact_applies(su: _Setup, Vs: int, student_side, teacher_logits) -> bool:
    """CPU, exact (dense teacher, no top k): the compiled sorted distance straight from both logits."""
    ops = _ops()
    return (not su.sparse_teacher and (su.top_k is None or su.top_k >= max(Vs, su.Vt))
            and ops.uses_compiled_kernels(student_side) and ops.uses_compiled_kernels(teacher_logits)
            and student_side.dtype != torch.float64 and teacher_logits.dtype != torch.float64)


def _compiled_exact_distances(su: _Setup, student_side, s_rows, s_length, teacher_logits, t_flat, Vs, chunk_size: int):
    """Exact distances of the pairs whose student rows are ``s_rows`` of ``student_side`` (logits [B, L, W]
    or [N, W]): softmaxes, sorts and L1 in one compiled pass per pair, no gathered rows."""
    from ctalign.errors import NonFiniteLogitsError
    from ctalign.ops._autograd import _SortedL1Logits
    xs = student_side.reshape(-1, student_side.shape[-1])
    xt = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    out = []
    for lo in range(0, s_rows.numel(), chunk_size):
        sr, tr = s_rows[lo:lo + chunk_size], t_flat[lo:lo + chunk_size]
        d, bad = _SortedL1Logits.apply(xs, sr, Vs, su.temp_s, xt, tr, su.Vt, su.temp_t)
        if bool(bad.any()):
            q = int(bad.nonzero()[0])
            if int(bad[q]) == 1:
                side, row, length, temp = "student", int(sr[q]), s_length, su.temp_s
            else:
                side, row, length, temp = "teacher", int(tr[q]), su.Lt, su.temp_t
            b, j = divmod(row, length)
            raise NonFiniteLogitsError(f"uld_loss: {side} logits at batch {b}, position {j} hold NaN or +inf, only "
                                       f"-inf, or overflow at temperature {temp}", row)
        out.append(d)
    return torch.cat(out)


def _row_distances(su: _Setup, xs, rows, Vs, s_where, t_where, Ls, dev):
    """Distances of paired rows: student logits ``xs`` [n, Vs] and the teacher's ``rows`` (dense or TopK);
    ``s_where`` / ``t_where``: their (batch, position) for errors."""
    _check_paired_rows(xs, *s_where, "student", su.temp_s, Ls)
    Vt, top_k = su.Vt, su.top_k
    if su.sparse_teacher:
        ps, tail_s = _sorted_probs(xs, top_k, su.temp_s)
        pt, tail_t = _sorted_topk_rows(rows, top_k, su.temp_t)
        return _uld_distance(ps, tail_s, pt.to(dev), tail_t.to(dev))
    _check_paired_rows(rows[:, :Vt], *t_where, "teacher", su.temp_t, su.Lt)
    if top_k is None or top_k >= max(Vs, Vt):
        # exact: every probability of both sides, sorted (on CPU by the compiled radix sorts)
        pt = torch.softmax(rows[:, :Vt].to(dev).float() / su.temp_t, -1)
        return _ops().sorted_l1_distance(torch.softmax(xs.float() / su.temp_s, -1), pt)
    ps, tail_s = _sorted_probs(xs, top_k, su.temp_s)
    pt, tail_t = _sorted_probs(rows[:, :Vt].to(dev), top_k, su.temp_t)
    return _uld_distance(ps, tail_s, pt, tail_t)


def uld_loss(student_logits: torch.Tensor, teacher_logits, student_ids, *, alignment=None,
             student_mask=None, teacher_mask=None, align: str = "positional", uld_weight: float = 1.0,
             ce_weight: float = 1.0, top_k: int | None = None, temperature: float = 1.0,
             student_vocab_size: int | None = None, teacher_vocab_size: int | None = None,
             reduction: str = "mean", chunk_size: int = 256, distance_mean: str = "pairs", ce_mask=None,
             student_temperature: float | None = None, teacher_temperature: float | None = None) -> torch.Tensor:
    """Universal Logit Distillation: ``ce_weight x CE + uld_weight x W1(sorted p_student, sorted p_teacher)``.

    W1 under uniform cost between two distributions over unrelated supports is the L1 distance of
    their probability vectors sorted in decreasing order, the shorter one padded with zeros.

    ``align='positional'`` (the paper): the i-th target token of the student is paired with the i-th
    target token of the teacher (both sides' masks select e.g. the response), i < min of the counts.
    ``align='byte'``: the i-th target token of each side *within the same chunk* (the groups between
    common boundaries, ``alignment.s_chunk``/``t_chunk``); tokens beyond the shorter group are not
    paired. With identical tokenizations both pairings coincide.

    ``top_k``: sort only the top k probabilities of each side and add ``|tail_s - tail_t|`` (the
    masses outside the top k). This *drops* the L1 distance inside the tails beyond the difference of
    their totals (a lower bound of it, by the triangle inequality); exact when k covers both
    vocabularies. A sparse teacher (``TopK`` rows, ``[B, Lt, k]``) is used as given.

    Exact (``top_k=None``, dense teacher rows): on CPU one compiled pass per pair from both logits rows
    in place (the softmaxes, radix sorts of both rows and the L1; the kernel of
    :func:`ctalign.ops.sorted_l1_distance`), once-differentiable; ``ops.force_backend("reference")``
    sorts with ``torch.sort``. Its softmax's exponentials are the kernels' vector exp: values agree with
    the torch path to about 1e-6, and near-tied ranks may take the other subgradient. On CPU with ``top_k`` below both
    vocabularies, the top k of dense rows comes from
    :func:`ctalign.ops.topk_logprobs` on the paired rows in place (one compiled pass per row, no
    softmax, no gathered row copies; its backward is once-differentiable: ``ops.force_backend
    ("reference")`` gives the pure-torch path for higher-order gradients). A sparse teacher's kept
    entries are used as given; at ``temperature`` T they are reshaped keeping their total mass (as in
    :mod:`ctalign.ops`), so its tail stays the mass the rows leave out.

    Paired rows holding NaN or +inf, only -inf, or overflowing at ``temperature`` raise
    :class:`~ctalign.errors.NonFiniteLogitsError` naming the side, batch and position (-inf entries
    alone are fine: masked tokens).

    ``teacher_logits``: ``[B, Lt, Wt]`` or ``TopK``. ``chunk_size``: pairs scored per step by the
    torch path (memory).

    Conventions of the reference implementations (the W1 core is the same in all of them):

    * ``distance_mean``: ``"pairs"`` (default) averages the distance over all aligned pairs of the
      batch; ``"examples"`` averages it over each example's pairs, then over the examples that have a
      pair (with ``reduction='none'`` each pair's value is divided by its example's pair count, so a
      row sums to its example's mean; ``'sum'`` sums the examples' means). The CE term keeps its
      token mean.
    * ``ce_mask``: the student tokens the CE scores (default ``student_mask``); ``student_mask`` and
      ``teacher_mask`` then select only the tokens the distance pairs (e.g. without eos).
    * ``student_temperature``, ``teacher_temperature``: one temperature per side in the distance
      (default ``temperature`` for both); the CE uses ``T = 1``.

    Settings that reproduce them (``loss`` = the response/label mask of each side, ``eos`` the side's
    eos id; values from your run's config):

    * llm-recipes (Boizard et al.'s ULD code): ``align='positional'``, ``top_k=None``,
      ``distance_mean='examples'``, ``ce_weight=crossentropy_weight``, ``uld_weight=distillation_weight``,
      ``student_temperature=student_temperature``, ``teacher_temperature=teacher_temperature``,
      ``ce_mask=student_loss``; its training config keeps eos in the CE and skips the student eos in
      the distance: ``student_mask=student_loss & (student_ids != student_eos)`` (and with
      ``skip_teacher_eos``, ``teacher_mask=teacher_loss & (teacher_ids != teacher_eos)``).
    * TRL GOLD (its ULD loss, without the hybrid term): the same mapping from its ``uld_*`` options
      (``uld_crossentropy_weight``, ``uld_distillation_weight``, ``uld_student_temperature``,
      ``uld_teacher_temperature``, ``uld_skip_student_eos``, ``uld_skip_teacher_eos``):
      ``distance_mean='examples'``, the eos-skipping masks as above, ``align='positional'``.
    """
    _check_reduction(reduction)
    Vs = _check_logits(student_logits, "student logits", student_vocab_size)
    B, Ls, _ = student_logits.shape
    dev = student_logits.device
    su = _setup(teacher_logits, student_ids, alignment, student_mask, teacher_mask, ce_mask, align=align, top_k=top_k,
                temperature=temperature, student_temperature=student_temperature,
                teacher_temperature=teacher_temperature, distance_mean=distance_mean,
                teacher_vocab_size=teacher_vocab_size, B=B, Ls=Ls, Vs=Vs, dev=dev)
    ids, ((sb, sj), (tb, tk)) = su.ids, su.pairs
    terms = _Terms(student_logits)
    if ce_weight != 0.0:
        terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, su.ce_t), su.ce_t.sum())
    else:
        _check_target_ids(ids, Vs, su.ce_t)  # the CE pass (skipped) would have refused them
    w1 = student_logits.new_zeros((B, Ls), dtype=torch.float32)
    if uld_weight != 0.0 and sb.numel():
        t_rows, _, _ = _teacher_rows(teacher_logits)
        t_flat_idx = (tb * su.Lt + (tk - 1)).to(_rows_device(t_rows))
        if _compiled_topk_applies(su, Vs, student_logits, teacher_logits):
            d = _compiled_topk_distances(su, student_logits, sb * Ls + (sj - 1), Ls, teacher_logits, t_rows,
                                         t_flat_idx, Vs, dev)
        elif _compiled_exact_applies(su, Vs, student_logits, teacher_logits):
            d = _compiled_exact_distances(su, student_logits, sb * Ls + (sj - 1), Ls, teacher_logits, t_flat_idx, Vs,
                                          chunk_size)
        else:
            d = torch.cat([_row_distances(su, student_logits[sb[lo:lo + chunk_size], sj[lo:lo + chunk_size] - 1, :Vs],
                                          _select_rows(t_rows, t_flat_idx[lo:lo + chunk_size]), Vs,
                                          (sb[lo:lo + chunk_size], sj[lo:lo + chunk_size] - 1),
                                          (tb[lo:lo + chunk_size], tk[lo:lo + chunk_size] - 1), Ls, dev)
                           for lo in range(0, sb.numel(), chunk_size)])
        w1 = w1.index_put((sb, sj), d)
    if distance_mean == "examples":
        per_example = torch.bincount(sb, minlength=B).to(w1.dtype)
        w1 = w1 / per_example.clamp_min(1)[:, None]
        terms.add(uld_weight, w1, int((per_example > 0).sum()))
    else:
        terms.add(uld_weight, w1, sb.numel())
    return terms.reduce(reduction)



class ULDLoss(nn.Module):
    """Module form of :func:`uld_loss` (same arguments; the weights and options fixed here)."""

    def __init__(self, *, align: str = "positional", uld_weight: float = 1.0, ce_weight: float = 1.0,
                 top_k: int | None = None, temperature: float = 1.0, student_vocab_size: int | None = None,
                 teacher_vocab_size: int | None = None, reduction: str = "mean", distance_mean: str = "pairs",
                 student_temperature: float | None = None, teacher_temperature: float | None = None):
        super().__init__()
        _check_reduction(reduction)
        if align not in ("positional", "byte"):
            raise ValueError(f"align must be 'positional' or 'byte', got {align!r}")
        if distance_mean not in ("pairs", "examples"):
            raise ValueError(f"distance_mean must be 'pairs' or 'examples', got {distance_mean!r}")
        self.align, self.uld_weight, self.ce_weight, self.top_k = align, uld_weight, ce_weight, top_k
        self.temperature = _check_temperature(temperature)
        self.distance_mean = distance_mean
        self.student_temperature = None if student_temperature is None else _check_temperature(student_temperature)
        self.teacher_temperature = None if teacher_temperature is None else _check_temperature(teacher_temperature)
        self.student_vocab_size, self.teacher_vocab_size, self.reduction = student_vocab_size, teacher_vocab_size, reduction

    def forward(self, student_logits, teacher_logits, student_ids, alignment=None, student_mask=None,
                teacher_mask=None, ce_mask=None):
        return uld_loss(student_logits, teacher_logits, student_ids, alignment=alignment, student_mask=student_mask,
                        teacher_mask=teacher_mask, align=self.align, uld_weight=self.uld_weight,
                        ce_weight=self.ce_weight, top_k=self.top_k, temperature=self.temperature,
                        student_vocab_size=self.student_vocab_size, teacher_vocab_size=self.teacher_vocab_size,
                        reduction=self.reduction, distance_mean=self.distance_mean, ce_mask=ce_mask,
                        student_temperature=self.student_temperature, teacher_temperature=self.teacher_temperature)

    def extra_repr(self) -> str:
        return (f"align={self.align!r}, uld_weight={self.uld_weight}, ce_weight={self.ce_weight}, "
                f"top_k={self.top_k}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"distance_mean={self.distance_mean!r}, student_temperature={self.student_temperature}, "
                f"teacher_temperature={self.teacher_temperature}")
