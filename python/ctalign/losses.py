"""Cross-tokenizer distillation losses: ULD, BLD (+ ByteHead), likelihood scoring, ALM.

Every loss is an ``nn.Module`` with a functional twin (``uld_loss``, ``byte_level_distillation_loss``,
``likelihood_distillation_loss``, ``alm_loss``). Definitions: ``shared/notes/design.md``.

Conventions shared by all of them
---------------------------------
* Logits are what the models return, unshifted: ``[B, L, W]`` with ``W >= vocabulary size`` (the
  padding columns of a padded output layer are ignored). Row ``j`` predicts token ``j + 1``.
* Masks are per *token*: ``student_mask[b, j]`` (``teacher_mask[b, k]``) says token ``j`` is a
  training target (e.g. a response token); it should also be 0 on padding. Token 0 is never a target
  (nothing predicts it). ``None``: every token within the alignment's lengths (or every token).
* ``temperature`` ``T`` divides the logits of both models in the distillation terms (no ``T**2``
  factor); the cross-entropy terms use ``T = 1``.
* Gradients flow to the student side only: teacher outputs are detached.
* ``reduction``: ``'none'`` gives per-student-token losses ``[B, Ls]`` (per chunk ``[B, C]`` for
  ALM), zero where nothing is counted, with the loss weights applied; ``'sum'`` is their sum;
  ``'mean'`` averages each term over the positions where that term is defined (tokens for CE,
  aligned pairs for ULD, bytes for BLD, target positions for KL, chunks for ALM) and adds the
  weighted averages. A term with no position (all masked, empty sequences) contributes a well-defined
  zero that is still connected to the graph (``loss.backward()`` works; DDP sees every parameter).
  Never NaN for finite inputs.
* Distributed data parallel: the losses hold no global state and work unchanged under DDP. With
  ``reduction='mean'`` each rank averages over its own positions (DDP then averages the ranks' means).
  ``reduction='global_mean'`` divides each term by its position count summed over the ranks of the
  default process group (one ``all_reduce`` of a few counts; every rank must call the loss) and
  multiplies by the world size, so that DDP's gradient averaging yields exactly the gradient of the
  mean over the whole global batch, as a single process would compute it. Without a process group
  it equals ``'mean'``.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ULDLoss", "uld_loss", "ByteHead", "ByteLevelDistillationLoss", "byte_level_distillation_loss",
    "LikelihoodDistillationLoss", "likelihood_distillation_loss", "likelihood_targets",
    "ApproximateLikelihoodMatchingLoss", "alm_loss", "chunk_logprobs", "token_byte_targets",
    "boundary_token_mask", "cross_entropy",
]

_REDUCTIONS = ("mean", "sum", "none", "global_mean")
_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------
def _ops():
    from ctalign import ops
    return ops


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_temperature(t: float, name: str = "temperature") -> float:
    t = float(t)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{name} must be a positive finite number, got {t}")
    return t


def _check_logits(x, name: str, vocab_size: int | None) -> int:
    """Validates ``[B, L, W]`` logits; returns the number of columns used (the vocabulary size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be [batch, length, vocab], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if vocab_size is None:
        return int(x.shape[-1])
    if x.shape[-1] < vocab_size:
        raise ValueError(f"{name} have {x.shape[-1]} columns, fewer than the {vocab_size} ids of the "
                         f"vocabulary they should score: wrong model or wrong tokenizer")
    return int(vocab_size)


def _check_ids(ids, name: str, shape, vocab_size: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(np.asarray(ids))
    if ids.dim() != 2 or tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must be [batch, length] = {tuple(shape)}, got {tuple(ids.shape)}")
    return ids.long()


def _vocab_len(v) -> int | None:
    return None if v is None else len(v)


def _fit(t: torch.Tensor, length: int, fill) -> torch.Tensor:
    """Crops or pads dim 1 of an alignment tensor to ``length``."""
    if t.shape[1] == length:
        return t
    if t.shape[1] > length:
        return t[:, :length]
    pad_shape = list(t.shape)
    pad_shape[1] = length - t.shape[1]
    return torch.cat([t, torch.full(pad_shape, fill, dtype=t.dtype, device=t.device)], 1)


def _token_mask(mask, lengths, shape, device) -> torch.Tensor:
    """bool [B, L]: tokens that are targets (token 0 never is)."""
    B, L = shape
    if mask is None:
        m = torch.ones(B, L, dtype=torch.bool, device=device)
    else:
        m = torch.as_tensor(mask, device=device)
        if tuple(m.shape) != (B, L):
            raise ValueError(f"mask must be [batch, length] = {(B, L)}, got {tuple(m.shape)}")
        m = m.bool()
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=device)
        m = m & (torch.arange(L, device=device)[None, :] < lengths[:, None])
    m = m.clone()
    if L:
        m[:, 0] = False
    return m


def _check_alignment_ids(alignment, ids: torch.Tensor, side: str) -> None:
    """The ids given to a loss must be the ids the alignment was computed for (within its lengths)."""
    if alignment is None or getattr(alignment, f"{side}_ids", None) is None:
        return
    ref = getattr(alignment, f"{side}_ids")
    lengths = getattr(alignment, f"{side}_lengths")
    L = min(ref.shape[1], ids.shape[1])
    if ref.shape[0] != ids.shape[0]:
        raise ValueError(f"the alignment has {ref.shape[0]} rows, the {side} ids {ids.shape[0]}")
    if bool((lengths > ids.shape[1]).any()):
        raise ValueError(f"the alignment covers {int(lengths.max())} {side} tokens, the {side} ids only {ids.shape[1]}")
    inside = torch.arange(L)[None, :] < lengths[:, None].cpu()
    if not torch.equal(ref[:, :L].cpu()[inside], ids[:, :L].cpu().long()[inside]):
        b = int(torch.nonzero((ref[:, :L].cpu() != ids[:, :L].cpu().long()) & inside)[0, 0])
        raise ValueError(f"the {side} ids of row {b} are not the ids the alignment was computed for")


def _alignment_lengths(alignment, side: str):
    if alignment is None:
        return None
    return alignment.student_lengths if side == "student" else alignment.teacher_lengths


def _check_target_ids(ids: torch.Tensor, vocab_size: int, target: torch.Tensor) -> None:
    if bool(((ids < 0) | (ids >= vocab_size))[target].any()):
        bad = ids[target & ((ids < 0) | (ids >= vocab_size))][0].item()
        raise ValueError(f"token id {bad} is outside the vocabulary of {vocab_size} ids")


def _shifted_ce(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``-log p(ids[j] | logits[j-1])`` [B, L] (0 where not a target)."""
    B, L, _ = logits.shape
    out = logits.new_zeros((B, L), dtype=torch.float32)
    if L < 2:
        return out + logits.sum() * 0.0
    _check_target_ids(ids, vocab_size, target)
    x = logits[:, :-1, :vocab_size].float()
    tgt = ids[:, 1:].clamp(0, vocab_size - 1)
    ce = F.cross_entropy(x.reshape(-1, vocab_size), tgt.reshape(-1), reduction="none").view(B, L - 1)
    ce = torch.where(target[:, 1:], ce, ce.new_zeros(()))
    return torch.cat([out[:, :1], ce], 1)


def cross_entropy(logits: torch.Tensor, ids, *, mask=None, lengths=None, vocab_size: int | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy with the conventions of this module: row ``j - 1`` of ``logits``
    ``[B, L, W]`` scores token ``j`` of ``ids`` ``[B, L]`` where ``mask`` says it is a target
    (padding columns past ``vocab_size`` ignored). ``'none'``: ``[B, L]`` (0 where not a target)."""
    _check_reduction(reduction)
    V = _check_logits(logits, "logits", vocab_size)
    B, L, _ = logits.shape
    ids = _check_ids(ids, "ids", (B, L), V).to(logits.device)
    target = _token_mask(mask, lengths, (B, L), logits.device)
    terms = _Terms(logits)
    terms.add(1.0, _shifted_ce(logits, ids, V, target), target.sum())
    return terms.reduce(reduction)


class _Terms:
    """Weighted loss terms, each defined on its own positions of a common ``[B, L]`` grid."""

    def __init__(self, anchor: torch.Tensor):
        self.anchor = anchor  # keeps zero losses connected to the graph
        self.terms: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def add(self, weight: float, values: torch.Tensor, count: torch.Tensor | int) -> None:
        if weight != 0.0:
            self.terms.append((float(weight), values, torch.as_tensor(count, device=values.device)))

    def reduce(self, reduction: str) -> torch.Tensor:
        zero = self.anchor.sum() * 0.0
        if reduction == "none":
            out = None
            for w, v, _ in self.terms:
                out = w * v if out is None else out + w * v
            if out is None:
                return self.anchor.new_zeros(self.anchor.shape[:2], dtype=torch.float32) + zero
            return out + zero
        total = zero.float()
        counts = [c for _, _, c in self.terms]
        scale = 1.0
        if reduction == "global_mean" and counts:
            counts, scale = _global_counts(counts)
        for (w, v, _), c in zip(self.terms, counts):
            s = v.sum()
            if reduction in ("mean", "global_mean"):
                s = s / c.clamp_min(1).to(device=s.device, dtype=s.dtype)
            total = total + w * s
        return total * scale if scale != 1.0 else total


def _global_counts(counts):
    """Counts summed over the default process group (one all_reduce), and the world size."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return counts, 1.0
    c = torch.stack([torch.as_tensor(x, dtype=torch.float64).reshape(()) for x in counts]).cpu()
    backend = dist.get_backend()
    if backend == "nccl":
        c = c.cuda()
    dist.all_reduce(c)
    return [x for x in c.cpu()], float(dist.get_world_size())


def _teacher_rows(teacher) -> tuple[Any, int, int]:
    """Flattens teacher logits [B, Lt, W] (or a TopK of [B, Lt, k]) to rows; returns (rows, B, Lt)."""
    from_topk = _is_topk(teacher)
    if from_topk:
        idx, lp = teacher.indices, teacher.logprobs
        if idx.dim() != 3:
            raise ValueError(f"TopK teacher rows must be [batch, length, k], got {tuple(idx.shape)}")
        B, Lt, k = idx.shape
        return _make_topk(idx.reshape(B * Lt, k), lp.reshape(B * Lt, k).detach()), B, Lt
    B, Lt, W = teacher.shape
    return teacher.detach().reshape(B * Lt, W), B, Lt


def _is_topk(x) -> bool:
    return hasattr(x, "indices") and hasattr(x, "logprobs") and not isinstance(x, torch.Tensor)


def _make_topk(indices, logprobs):
    from ctalign.ops import TopK
    return TopK(indices, logprobs)


def _select_rows(rows, index: torch.Tensor):
    if _is_topk(rows):
        return _make_topk(rows.indices[index], rows.logprobs[index])
    return rows[index]


# ------------------------------------------------------------------------------------------------
# ULD
# ------------------------------------------------------------------------------------------------
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
    from ctalign.reference import tempered_logprobs
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


def uld_loss(student_logits: torch.Tensor, teacher_logits, student_ids, *, alignment=None,
             student_mask=None, teacher_mask=None, align: str = "positional", uld_weight: float = 1.0,
             ce_weight: float = 1.0, top_k: int | None = None, temperature: float = 1.0,
             student_vocab_size: int | None = None, teacher_vocab_size: int | None = None,
             reduction: str = "mean", chunk_size: int = 256) -> torch.Tensor:
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

    On CPU with ``top_k`` below both vocabularies, the top k of dense rows comes from
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
    """
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    if align not in ("positional", "byte"):
        raise ValueError(f"align must be 'positional' or 'byte', got {align!r}")
    if top_k is not None:
        top_k = int(top_k)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    Vs = _check_logits(student_logits, "student logits", student_vocab_size)
    B, Ls, _ = student_logits.shape
    sparse_teacher = _is_topk(teacher_logits)
    if sparse_teacher:
        B_t, Lt = teacher_logits.indices.shape[:2]
        Vt = None
    else:
        Vt = _check_logits(teacher_logits, "teacher logits", teacher_vocab_size)
        B_t, Lt = teacher_logits.shape[:2]
    if B_t != B:
        raise ValueError(f"teacher batch {B_t} != student batch {B}")
    ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(student_logits.device)
    _check_alignment_ids(alignment, ids, "student")
    dev = student_logits.device
    s_t = _token_mask(student_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    t_t = _token_mask(teacher_mask, _alignment_lengths(alignment, "teacher"), (B, Lt), dev)
    if align == "byte":
        if alignment is None:
            raise ValueError("align='byte' needs the alignment (ctalign.align.align) of the two tokenizations")
        (sb, sj), (tb, tk) = _pairs_byte(s_t, t_t, _fit(alignment.s_chunk.to(dev), Ls, -1),
                                         _fit(alignment.t_chunk.to(dev), Lt, -1))
    else:
        (sb, sj), (tb, tk) = _pairs_positional(s_t, t_t)
    terms = _Terms(student_logits)
    if ce_weight != 0.0:
        terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, s_t), s_t.sum())
    else:
        _check_target_ids(ids, Vs, s_t)  # the CE pass (skipped) would have refused them
    w1 = student_logits.new_zeros((B, Ls), dtype=torch.float32)
    compiled = (top_k is not None and top_k < Vs and (sparse_teacher or top_k < Vt)
                and _ops().uses_compiled_kernels(student_logits)
                and (sparse_teacher or _ops().uses_compiled_kernels(teacher_logits)))
    if uld_weight != 0.0 and sb.numel() and compiled:
        # CPU: both sides' top k from the paired rows in place (no softmax, no gathered row copies)
        t_rows, _, _ = _teacher_rows(teacher_logits)
        t_flat_idx = (tb * Lt + (tk - 1)).to(_rows_device(t_rows))
        ps = _compiled_top_probs(student_logits, sb * Ls + (sj - 1), top_k, Vs, temperature, "student", Ls)
        if sparse_teacher:
            pt, tail_t = _sorted_topk_rows(_select_rows(t_rows, t_flat_idx), top_k, temperature)
        else:
            pt = _compiled_top_probs(teacher_logits.detach(), t_flat_idx, top_k, Vt, temperature, "teacher", Lt)
            tail_t = (1.0 - pt.sum(-1)).clamp_min(0.0)
        tail_s = (1.0 - ps.sum(-1)).clamp_min(0.0)
        w1 = w1.index_put((sb, sj), _uld_distance(ps, tail_s, pt.to(dev), tail_t.to(dev)))
    elif uld_weight != 0.0 and sb.numel():
        t_rows, _, _ = _teacher_rows(teacher_logits)
        t_flat_idx = tb * Lt + (tk - 1)
        vals = []
        for lo in range(0, sb.numel(), chunk_size):
            hi = min(lo + chunk_size, sb.numel())
            xs = student_logits[sb[lo:hi], sj[lo:hi] - 1, :Vs]
            _check_paired_rows(xs, sb[lo:hi], sj[lo:hi] - 1, "student", temperature, Ls)
            ps, tail_s = _sorted_probs(xs, top_k, temperature)
            rows = _select_rows(t_rows, t_flat_idx[lo:hi].to(_rows_device(t_rows)))
            if sparse_teacher:
                pt, tail_t = _sorted_topk_rows(rows, top_k, temperature)
                pt, tail_t = pt.to(dev), tail_t.to(dev)
            else:
                _check_paired_rows(rows[:, :Vt], tb[lo:hi], tk[lo:hi] - 1, "teacher", temperature, Lt)
                pt, tail_t = _sorted_probs(rows[:, :Vt].to(dev), top_k, temperature)
            if top_k is not None and not sparse_teacher and top_k >= max(Vs, Vt):
                tail_s = tail_t = None
            vals.append(_uld_distance(ps, tail_s, pt, tail_t))
        w1 = w1.index_put((sb, sj), torch.cat(vals))
    terms.add(uld_weight, w1, sb.numel())
    return terms.reduce(reduction)


def _rows_device(rows):
    return rows.indices.device if _is_topk(rows) else rows.device


class ULDLoss(nn.Module):
    """Module form of :func:`uld_loss` (same arguments; the weights and options fixed here)."""

    def __init__(self, *, align: str = "positional", uld_weight: float = 1.0, ce_weight: float = 1.0,
                 top_k: int | None = None, temperature: float = 1.0, student_vocab_size: int | None = None,
                 teacher_vocab_size: int | None = None, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        if align not in ("positional", "byte"):
            raise ValueError(f"align must be 'positional' or 'byte', got {align!r}")
        self.align, self.uld_weight, self.ce_weight, self.top_k = align, uld_weight, ce_weight, top_k
        self.temperature = _check_temperature(temperature)
        self.student_vocab_size, self.teacher_vocab_size, self.reduction = student_vocab_size, teacher_vocab_size, reduction

    def forward(self, student_logits, teacher_logits, student_ids, alignment=None, student_mask=None,
                teacher_mask=None):
        return uld_loss(student_logits, teacher_logits, student_ids, alignment=alignment, student_mask=student_mask,
                        teacher_mask=teacher_mask, align=self.align, uld_weight=self.uld_weight,
                        ce_weight=self.ce_weight, top_k=self.top_k, temperature=self.temperature,
                        student_vocab_size=self.student_vocab_size, teacher_vocab_size=self.teacher_vocab_size,
                        reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"align={self.align!r}, uld_weight={self.uld_weight}, ce_weight={self.ce_weight}, "
                f"top_k={self.top_k}, temperature={self.temperature}, reduction={self.reduction!r}")


# ------------------------------------------------------------------------------------------------
# BLD: byte head and byte-level distillation
# ------------------------------------------------------------------------------------------------
END_BYTE = 256  # the end-of-token class of ByteHead


class ByteHead(nn.Module):
    """A small head on the student's last hidden states predicting the first ``K`` bytes of the
    *next* student token, each over 256 bytes plus an end-of-token class (257 classes).

    ``forward(hidden [B, L, H]) -> logits [B, L, K, 257]``. It is a separate module that only reads
    the hidden states: the student model itself is never modified, so dropping the head (not saving
    it) leaves the student exactly as it was, exportable as is. Architecture: LayerNorm, then a
    linear map per byte position on top of a shared projection (``H -> K x hidden``) with a GELU.
    """

    def __init__(self, hidden_size: int, num_bytes: int = 10, inner_size: int | None = None):
        super().__init__()
        if num_bytes < 1:
            raise ValueError(f"num_bytes must be >= 1, got {num_bytes}")
        self.hidden_size, self.num_bytes = int(hidden_size), int(num_bytes)
        inner = int(inner_size or min(hidden_size, 256))
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, num_bytes * inner)
        self.out = nn.Parameter(torch.empty(num_bytes, inner, 257))
        self.bias = nn.Parameter(torch.zeros(num_bytes, 257))
        nn.init.normal_(self.out, std=inner ** -0.5)
        self.inner = inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"ByteHead expects hidden size {self.hidden_size}, got {hidden.shape[-1]}")
        h = F.gelu(self.proj(self.norm(hidden)))
        h = h.view(*hidden.shape[:-1], self.num_bytes, self.inner)
        return torch.einsum("...ki,kic->...kc", h, self.out.to(h.dtype)) + self.bias.to(h.dtype)


_BYTE_TARGET_CACHE: dict = {}


def token_byte_targets(vocab, num_bytes: int, device=None) -> torch.Tensor:
    """``int64[V, K]``: byte ``i`` of each token, ``END_BYTE`` right after its last byte (at 0 for a
    token without bytes), ``-100`` (ignored) after that. Cached per vocabulary."""
    key = (id(vocab), getattr(vocab, "fingerprint", None), int(num_bytes))
    t = _BYTE_TARGET_CACHE.get(key)
    if t is None:
        offsets, data, _ = vocab.byte_table()
        offsets = np.asarray(offsets, dtype=np.int64)
        data = np.asarray(data, dtype=np.int64)
        V = len(offsets) - 1
        lengths = offsets[1:] - offsets[:-1]
        out = np.full((V, num_bytes), -100, dtype=np.int64)
        for i in range(num_bytes):
            has = lengths > i
            out[has, i] = data[offsets[:-1][has] + i]
            out[lengths == i, i] = END_BYTE
        t = torch.from_numpy(out)
        _BYTE_TARGET_CACHE[key] = t
    return t if device is None else t.to(device)


def byte_level_distillation_loss(student_logits: torch.Tensor, head_logits: torch.Tensor, teacher_logits,
                                 student_ids, alignment, *, student_vocab, teacher_vocab, student_mask=None,
                                 lambda_b: float = 1.0, lambda_kl: float = 0.1, ce_weight: float = 1.0,
                                 temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """BLD: ``ce_weight x token CE + lambda_b x byte CE + lambda_kl x KL(teacher bytes || head)``.

    ``head_logits [B, Ls, K, 257]`` (:class:`ByteHead` on the student's hidden states): row ``j``
    predicts the first K bytes of student token ``j + 1``. Byte CE: the token's own bytes, then the
    end class after its last byte (for a special token: end at byte 0). KL: at every byte ``i`` of the
    token that lies in the text, the teacher's next-byte distribution at that byte offset, from the
    teacher row and byte-trie prefix of ``alignment.byte_row/byte_prefix`` (``align(...,
    byte_queries=K)``): ``byte_conditional_logprobs`` without its ``end`` column, renormalised over
    the teacher tokens that continue past the prefix. What this target drops: the probability that
    the teacher token ends exactly there (the byte after a token end needs the next teacher step),
    and the dummy-prefix space of SentencePiece tokens (no teacher byte: not in the KL). The head's
    end class has no teacher target. KL positions without teacher mass are skipped.
    """
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    Vs = _check_logits(student_logits, "student logits", len(student_vocab))
    B, Ls, _ = student_logits.shape
    if head_logits.dim() != 4 or tuple(head_logits.shape[:2]) != (B, Ls) or head_logits.shape[-1] != 257:
        raise ValueError(f"head logits must be [batch, length, K, 257] with batch, length = {(B, Ls)}, "
                         f"got {tuple(head_logits.shape)}")
    K = head_logits.shape[2]
    dev = student_logits.device
    ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(dev)
    _check_alignment_ids(alignment, ids, "student")
    target = _token_mask(student_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    terms = _Terms(student_logits)
    terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, target), target.sum())
    anchor_head = head_logits.sum() * 0.0
    # byte CE: head row j-1 -> bytes of token j
    bt = token_byte_targets(student_vocab, K, dev)[ids.clamp(0, Vs - 1)]  # [B, Ls, K]
    byte_ce = head_logits.new_zeros((B, Ls), dtype=torch.float32)
    n_bytes = 0
    if Ls > 1:
        h = head_logits[:, :-1].float()
        y = bt[:, 1:].masked_fill(~target[:, 1:, None], -100)
        ce = F.cross_entropy(h.reshape(-1, 257), y.reshape(-1), ignore_index=-100, reduction="none").view(B, Ls - 1, K)
        byte_ce = torch.cat([byte_ce[:, :1], ce.sum(-1)], 1)
        n_bytes = (y != -100).sum()
    terms.add(lambda_b, byte_ce + anchor_head, n_bytes)
    # KL to the teacher's byte conditionals
    kl = head_logits.new_zeros((B, Ls), dtype=torch.float32)
    n_kl = 0
    if lambda_kl != 0.0 and Ls > 1:
        if alignment is None or alignment.byte_row.shape[-1] < K:
            raise ValueError(f"BLD needs align(..., byte_queries={K}) (alignment with byte queries for K bytes)")
        t_rows, Bt, Lt = _teacher_rows(teacher_logits)
        if Bt != B:
            raise ValueError(f"teacher batch {Bt} != student batch {B}")
        if not _is_topk(teacher_logits):
            _check_logits(teacher_logits, "teacher logits", len(teacher_vocab))
        brow = _fit(alignment.byte_row[..., :K].to(dev), Ls, -1)
        bpre = _fit(alignment.byte_prefix[..., :K].to(dev), Ls, -1)
        ok = (brow >= 0) & (bpre >= 0) & target[:, :, None] & (bt >= 0) & (bt < 256)
        ok[:, 0] = False
        qb, qj, qi = torch.nonzero(ok, as_tuple=True)
        if qb.numel():
            rows = (qb * Lt + brow[qb, qj, qi]).to(_rows_device(t_rows))
            pre = bpre[qb, qj, qi].to(_rows_device(t_rows))
            with torch.no_grad():
                lp = _ops().byte_conditional_logprobs(t_rows, teacher_vocab, rows, pre, temperature=temperature,
                                                      drop_end=True)
                lp = lp[:, :256].float().to(dev)
            good = torch.isfinite(lp).any(-1)
            qb, qj, qi, lp = qb[good], qj[good], qi[good], lp[good]
            head_lp = torch.log_softmax(head_logits[qb, qj - 1, qi].float() / temperature, -1)[:, :256]
            p = lp.exp()
            v = torch.where(p > 0, p * (lp - head_lp), torch.zeros_like(p)).sum(-1)
            kl = kl.index_put((qb, qj), v, accumulate=True)
            n_kl = qb.numel()
    terms.add(lambda_kl, kl + anchor_head, n_kl)
    return terms.reduce(reduction)


class ByteLevelDistillationLoss(nn.Module):
    """Module form of :func:`byte_level_distillation_loss` (defaults lambda_b = 1, lambda_kl = 0.1).

    Holds no parameters: the :class:`ByteHead` is the caller's (train it with the student)."""

    def __init__(self, student_vocab, teacher_vocab, *, num_bytes: int = 10, lambda_b: float = 1.0,
                 lambda_kl: float = 0.1, ce_weight: float = 1.0, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.student_vocab, self.teacher_vocab = student_vocab, teacher_vocab
        self.num_bytes, self.lambda_b, self.lambda_kl, self.ce_weight = int(num_bytes), lambda_b, lambda_kl, ce_weight
        self.temperature = _check_temperature(temperature)
        self.reduction = reduction

    def forward(self, student_logits, head_logits, teacher_logits, student_ids, alignment, student_mask=None):
        if head_logits.dim() == 4 and head_logits.shape[2] != self.num_bytes:
            raise ValueError(f"head predicts {head_logits.shape[2]} bytes, the loss expects {self.num_bytes}")
        return byte_level_distillation_loss(
            student_logits, head_logits, teacher_logits, student_ids, alignment, student_vocab=self.student_vocab,
            teacher_vocab=self.teacher_vocab, student_mask=student_mask, lambda_b=self.lambda_b,
            lambda_kl=self.lambda_kl, ce_weight=self.ce_weight, temperature=self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"num_bytes={self.num_bytes}, lambda_b={self.lambda_b}, lambda_kl={self.lambda_kl}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")


# ------------------------------------------------------------------------------------------------
# Likelihood scoring
# ------------------------------------------------------------------------------------------------
class LikelihoodTargets(NamedTuple):
    logprobs: torch.Tensor    # [B, Ls, Vs + 1]: target for student token j (column Vs = end), -inf rows if none
    valid: torch.Tensor       # [B, Ls] bool: a target exists
    end_logprob: torch.Tensor  # [B, Ls]: log q(end | pieces through token j) where j ends a teacher token, else 0


def likelihood_targets(teacher_logits, amap, alignment, *, temperature: float = 1.0,
                       with_end: bool = False, student_width: int | None = None) -> LikelihoodTargets:
    """The teacher's distribution over the student vocabulary (+ ``end``) for every student token.

    For student token ``j`` (predicted by student row ``j - 1``): at a teacher boundary,
    ``project_to_student`` of teacher row ``alignment.s_teacher_row[j]``; inside a teacher token,
    ``project_to_student_within`` of that row given the student pieces already consumed there
    (``alignment.s_consumed``). Matched specials use the boundary projection (eos to eos, ...).
    In the identical regime the target is the teacher's own distribution, permuted through the
    identical pairs.

    Exact in the subset regime: along the student tokens of a teacher token the targets telescope,
    and with ``with_end=True`` ``end_logprob`` (log q(end) after the last piece of every teacher
    token) completes them, so ``sum_j target[j, s_j] + sum end_logprob = log p_teacher(text)``.
    General regime (documented approximation): ``dec_S`` stands for how the student splits each
    teacher token; student tokens that cross a teacher boundary are scored by the teacher tokens
    whose ``dec_S`` starts with them (the continuation into the next teacher token is dropped), and
    positions whose consumed pieces are not a ``dec_S`` prefix get no target (``valid`` False).
    """
    temperature = _check_temperature(temperature)
    plan = _TargetPlan(teacher_logits, amap, alignment, student_width)
    B, Ls, Vs, dev = plan.B, plan.Ls, amap.n_student, plan.device
    out = torch.full((B, Ls, Vs + 1), _NEG_INF, dtype=torch.float32, device=dev)
    end_lp = torch.zeros((B, Ls), dtype=torch.float32, device=dev)
    has = plan.has_target
    if has.any():
        out[has] = plan.rows(plan.flat_row[has], plan.at_boundary[has], plan.consumed[has], temperature)
    if with_end and plan.regime != "identical":
        after = _fit(alignment.s_consumed_after.to(dev), Ls, -1)
        ends = _fit(alignment.s_ends_teacher.to(dev), Ls, False) & (plan.row >= 0) & (after >= 0)
        if ends.any():
            with torch.no_grad():
                w = _ops().project_to_student_within(plan.teacher_rows, amap, plan.flat_row[ends], after[ends].int(),
                                                     temperature=temperature)
            end_lp[ends] = w.float()[:, Vs]
    valid = has & torch.isfinite(out[..., :Vs]).any(-1)
    return LikelihoodTargets(out, valid, end_lp)


class _TargetPlan:
    """Which teacher row and query serve each student token (see :func:`likelihood_targets`), and the
    target rows for any subset of the tokens (so the loss can build them a chunk at a time)."""

    def __init__(self, teacher_logits, amap, alignment, student_width=None):
        self.teacher_rows, self.B, self.Lt = _teacher_rows(teacher_logits)
        self.amap = amap
        self.regime = getattr(amap, "regime", None)
        if not _is_topk(teacher_logits):
            _check_logits(teacher_logits, "teacher logits", amap.n_teacher)
        dev = self.device = _rows_device(self.teacher_rows)
        Ls = self.Ls = alignment.s_teacher_row.shape[1] if student_width is None else int(student_width)
        row = self.row = _fit(alignment.s_teacher_row.to(dev), Ls, -1)
        if row.shape[0] != self.B:
            raise ValueError(f"alignment has {row.shape[0]} rows, teacher logits {self.B}")
        if bool((row >= self.Lt).any()):
            raise ValueError(f"alignment refers to teacher position {int(row.max())}, teacher logits have {self.Lt}")
        self.at_boundary = _fit(alignment.s_at_boundary.to(dev), Ls, False)
        self.consumed = _fit(alignment.s_consumed.to(dev), Ls, -1)
        self.flat_row = torch.arange(self.B, device=dev)[:, None] * self.Lt + row
        if self.regime == "identical":
            self.has_target = row >= 0
        else:
            self.has_target = (row >= 0) & (self.at_boundary | (self.consumed >= 0))

    @torch.no_grad()
    def rows(self, flat_row, at_boundary, consumed, temperature) -> torch.Tensor:
        """[Q, V_s + 1] float32 target log-probs for Q student tokens that have a target."""
        amap, ops = self.amap, _ops()
        Vs, Vt, dev = amap.n_student, amap.n_teacher, self.device
        out = torch.full((flat_row.numel(), Vs + 1), _NEG_INF, dtype=torch.float32, device=dev)
        if flat_row.numel() == 0:
            return out
        if self.regime == "identical":
            rows = _select_rows(self.teacher_rows, flat_row)
            if _is_topk(rows):
                lp = torch.full((flat_row.numel(), Vt), _NEG_INF, device=dev)
                lp.scatter_(1, rows.indices.long(), rows.logprobs.float())
                lp = torch.log_softmax(lp / temperature, -1)
            else:
                lp = torch.log_softmax(rows[:, :Vt].float() / temperature, -1)
            # identical regime = equal fingerprints: the same id -> bytes table, specials included, so
            # the student's distribution is the teacher's, id for id (the end column stays empty).
            out[:, :Vs] = lp[:, :Vs]
            return out
        inside = ~at_boundary
        if at_boundary.any():
            uniq, inv = torch.unique(flat_row[at_boundary], return_inverse=True)
            proj = ops.project_to_student(_select_rows(self.teacher_rows, uniq), amap, temperature=temperature)
            out[at_boundary] = proj.float()[inv]
        if inside.any():
            out[inside] = ops.project_to_student_within(self.teacher_rows, amap, flat_row[inside],
                                                        consumed[inside].int(), temperature=temperature).float()
        return out


def _kl_rows(target_lp: torch.Tensor, student_lp: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """KL(target || student) per row; ``top_k``: over the target's top k plus one 'rest' bin."""
    if top_k is None or top_k >= target_lp.shape[-1]:
        p = target_lp.exp()
        return torch.where(p > 0, p * (target_lp - student_lp), torch.zeros_like(p)).sum(-1)
    lp_top, idx = torch.topk(target_lp, top_k, -1)
    p_top = lp_top.exp()
    q_top = student_lp.gather(-1, idx)
    kl = torch.where(p_top > 0, p_top * (lp_top - q_top), torch.zeros_like(p_top)).sum(-1)
    rest_p = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    rest_q_lp = torch.logsumexp(student_lp.scatter(-1, idx, _NEG_INF), -1)
    rest_lp = torch.log(rest_p.clamp_min(1e-30))
    kl = kl + torch.where(rest_p > 1e-7, rest_p * (rest_lp - rest_q_lp), torch.zeros_like(rest_p))
    return kl


def likelihood_distillation_loss(student_logits: torch.Tensor, teacher_logits, student_ids, alignment, amap, *,
                                 student_mask=None, kl_weight: float = 0.8, ce_weight: float = 0.2,
                                 top_k: int | None = 64, temperature: float = 1.0, reduction: str = "mean",
                                 targets: LikelihoodTargets | None = None, chunk_size: int = 512) -> torch.Tensor:
    """Cross-tokenizer likelihood scoring: ``kl_weight x KL(teacher -> student vocab || student) +
    ce_weight x CE`` (defaults 0.8 and 0.2).

    The teacher targets are :func:`likelihood_targets`; the KL uses their fast form: the ``end`` column
    is dropped and the rest renormalised (what this drops: inside a teacher token, the mass of the
    teacher tokens that end exactly there and would be followed by another teacher token; at a
    boundary, the mass of teacher specials that have no student counterpart). ``top_k``: KL over the
    target's top k student tokens plus one bin for the rest of the mass (exact when k covers the
    vocabulary); ``None``: dense KL. Student positions without a target count in the CE only.
    Targets are built ``chunk_size`` positions at a time (memory ``O(chunk_size x V_s)`` beyond the
    logits), or taken from ``targets`` (:func:`likelihood_targets`, e.g. precomputed).
    """
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    Vs = _check_logits(student_logits, "student logits", amap.n_student)
    B, Ls, _ = student_logits.shape
    dev = student_logits.device
    ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(dev)
    _check_alignment_ids(alignment, ids, "student")
    target = _token_mask(student_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    terms = _Terms(student_logits)
    terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, target), target.sum())
    kl = student_logits.new_zeros((B, Ls), dtype=torch.float32)
    n_kl = 0
    if kl_weight != 0.0 and Ls > 1:
        def kl_of(qb, qj, t):
            t = t[:, :Vs]
            good = torch.isfinite(t).any(-1)
            qb, qj, t = qb[good], qj[good], t[good]
            t = t - torch.logsumexp(t, -1, keepdim=True)
            s = torch.log_softmax(student_logits[qb, qj - 1, :Vs].float() / temperature, -1)
            return qb, qj, _kl_rows(t, s, top_k)

        parts = []
        if targets is not None:
            tl, tvalid = targets.logprobs.to(dev), targets.valid.to(dev)
            if tuple(tl.shape[:2]) != (B, Ls):
                raise ValueError(f"targets are for shape {tuple(tl.shape[:2])}, student logits {(B, Ls)}")
            pos = tvalid & target
            pos[:, 0] = False
            qb, qj = torch.nonzero(pos, as_tuple=True)
            parts.append(kl_of(qb, qj, tl[qb, qj]))
        else:
            plan = _TargetPlan(teacher_logits, amap, alignment, Ls)
            pos = plan.has_target.to(dev) & target
            pos[:, 0] = False
            qb, qj = torch.nonzero(pos, as_tuple=True)
            for lo in range(0, qb.numel(), chunk_size):
                b_, j_ = qb[lo:lo + chunk_size], qj[lo:lo + chunk_size]
                pb, pj = b_.to(plan.device), j_.to(plan.device)
                t = plan.rows(plan.flat_row[pb, pj], plan.at_boundary[pb, pj], plan.consumed[pb, pj], temperature)
                parts.append(kl_of(b_, j_, t.to(dev)))
        for qb, qj, v in parts:
            if qb.numel():
                kl = kl.index_put((qb, qj), v, accumulate=True)
                n_kl += qb.numel()
    terms.add(kl_weight, kl, n_kl)
    return terms.reduce(reduction)


class LikelihoodDistillationLoss(nn.Module):
    """Module form of :func:`likelihood_distillation_loss` for one alignment map."""

    def __init__(self, amap, *, kl_weight: float = 0.8, ce_weight: float = 0.2, top_k: int | None = 64,
                 temperature: float = 1.0, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.amap = amap
        self.kl_weight, self.ce_weight, self.top_k = kl_weight, ce_weight, top_k
        self.temperature = _check_temperature(temperature)
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, student_ids, alignment, student_mask=None):
        return likelihood_distillation_loss(student_logits, teacher_logits, student_ids, alignment, self.amap,
                                            student_mask=student_mask, kl_weight=self.kl_weight,
                                            ce_weight=self.ce_weight, top_k=self.top_k,
                                            temperature=self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"regime={getattr(self.amap, 'regime', None)!r}, kl_weight={self.kl_weight}, "
                f"ce_weight={self.ce_weight}, top_k={self.top_k}, temperature={self.temperature}")


# ------------------------------------------------------------------------------------------------
# ALM
# ------------------------------------------------------------------------------------------------
_BOUNDARY_CACHE: dict = {}


def boundary_token_mask(vocab) -> torch.Tensor:
    """bool[V]: tokens that begin at a word boundary (bytes starting with whitespace) or have no
    bytes (specials, e.g. eos). Used by ALM's debiasing. Cached per vocabulary."""
    key = (id(vocab), getattr(vocab, "fingerprint", None))
    m = _BOUNDARY_CACHE.get(key)
    if m is None:
        offsets, data, _ = vocab.byte_table()
        offsets = np.asarray(offsets)
        data = np.asarray(data)
        V = len(offsets) - 1
        has = offsets[1:] > offsets[:-1]
        first = np.zeros(V, dtype=np.uint8)
        first[has] = data[offsets[:-1][has]]
        ws = np.isin(first, np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8))
        if getattr(vocab, "word_start", None) is not None:
            ws = ws | np.asarray(vocab.word_start, dtype=bool)
        m = torch.from_numpy((~has) | (has & ws))
        _BOUNDARY_CACHE[key] = m
    return m


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log p(ids[j] | row j-1) [B, L] (0 at j = 0)."""
    B, L, _ = logits.shape
    if L < 2:
        return logits.new_zeros((B, L), dtype=torch.float32) + logits.sum() * 0.0
    x = logits[:, :-1, :vocab_size].float() / temperature
    lp = x.gather(-1, ids[:, 1:, None].clamp(0, vocab_size - 1)).squeeze(-1) - torch.logsumexp(x, -1)
    return torch.cat([lp.new_zeros((B, 1)), lp], 1)


def chunk_logprobs(logits: torch.Tensor, ids, chunk: torch.Tensor, target: torch.Tensor, n_chunks: int,
                   vocab_size: int, temperature: float = 1.0):
    """(sum of token log-probs per chunk [B, C], chunk has a token that is no target [B, C] bool,
    index of each chunk's last token [B, C] (-1 if none))."""
    B, L, _ = logits.shape
    dev = logits.device
    lp = _token_logprobs(logits, ids, vocab_size, temperature)
    inc = chunk >= 0
    c = chunk.clamp_min(0)
    sums = torch.zeros((B, n_chunks), dtype=torch.float32, device=dev)
    sums = sums.scatter_add(1, c, torch.where(inc & target, lp, torch.zeros_like(lp)))
    bad = torch.zeros((B, n_chunks), dtype=torch.long, device=dev)
    bad = bad.scatter_add(1, c, (inc & ~target).long())
    last = torch.full((B, n_chunks), -1, dtype=torch.long, device=dev)
    pos = torch.arange(L, device=dev)[None].expand(B, L)
    last = last.scatter_reduce(1, c, torch.where(inc, pos, torch.full_like(pos, -1)), reduce="amax")
    return sums, bad > 0, last


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def alm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_ids, teacher_ids, alignment, *,
             student_mask=None, teacher_mask=None, tau: float = 100.0, temperature: float = 1.0,
             debias: bool = False, student_vocab=None, teacher_vocab=None, reduction: str = "mean",
             eps: float = 1e-6) -> torch.Tensor:
    """Approximate likelihood matching: for every chunk (the span between two common boundaries) the
    teacher's and the student's log-likelihoods ``l_T``, ``l_S`` (sums of the token log-probs of the
    chunk), compared by the binary cross-entropy of ``y = exp(l / tau)``:
    ``-(y_T log y_S + (1 - y_T) log(1 - y_S))``, with ``eps`` subtracted from ``l / tau`` so that a
    likelihood of 1 stays finite. Its minimum over ``l_S`` is at ``l_S = l_T`` (the value there is
    the binary entropy of ``y_T``, not 0).

    Chunks count when every token of both sides in them is a target (token 0, masked or padding
    tokens exclude a chunk) and both sides have a token there; matched special pairs (e.g. eos) are
    chunks too. ``debias``: add to each side's chunk log-likelihood the log-probability, at the row
    after the chunk's last token, that the next token starts at a word boundary
    (:func:`boundary_token_mask`: whitespace-initial tokens and specials; needs the vocabularies),
    i.e. that the tokenization really breaks after the chunk. What ALM drops: the likelihood of a
    chunk is the probability of one tokenization of it (the model's own), not the marginal over all
    its tokenizations; ``debias`` corrects only the boundary at its end.
    """
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    tau = _check_temperature(tau, "tau")
    if _is_topk(teacher_logits):
        raise TypeError("ALM needs the teacher's dense logits (the log-prob of every teacher token of the text)")
    Vs = _check_logits(student_logits, "student logits", _vocab_len(student_vocab))
    Vt = _check_logits(teacher_logits, "teacher logits", _vocab_len(teacher_vocab))
    B, Ls, _ = student_logits.shape
    Bt, Lt, _ = teacher_logits.shape
    if Bt != B:
        raise ValueError(f"teacher batch {Bt} != student batch {B}")
    if alignment is None:
        raise ValueError("ALM needs the alignment (ctalign.align.align) of the two tokenizations")
    dev = student_logits.device
    s_ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(dev)
    t_ids = _check_ids(teacher_ids, "teacher_ids", (B, Lt), Vt).to(dev)
    _check_alignment_ids(alignment, s_ids, "student")
    _check_alignment_ids(alignment, t_ids, "teacher")
    s_t = _token_mask(student_mask, alignment.student_lengths, (B, Ls), dev)
    t_t = _token_mask(teacher_mask, alignment.teacher_lengths, (B, Lt), dev)
    C = max(int(alignment.n_chunks.max().item()) if alignment.n_chunks.numel() else 0, 1)
    s_chunk = _fit(alignment.s_chunk.to(dev), Ls, -1)
    t_chunk = _fit(alignment.t_chunk.to(dev), Lt, -1)
    t_logits = teacher_logits.detach().to(dev)
    ls, s_bad, s_last = chunk_logprobs(student_logits, s_ids, s_chunk, s_t, C, Vs, temperature)
    with torch.no_grad():
        lt, t_bad, t_last = chunk_logprobs(t_logits, t_ids, t_chunk, t_t, C, Vt, temperature)
    cs = alignment.chunk_s_count[:, :C].to(dev)
    ct = alignment.chunk_t_count[:, :C].to(dev)
    if cs.shape[1] < C:
        cs = F.pad(cs, (0, C - cs.shape[1]))
        ct = F.pad(ct, (0, C - ct.shape[1]))
    valid = ~s_bad & ~t_bad & (cs > 0) & (ct > 0) & (s_last >= 0) & (t_last >= 0)
    if debias:
        if student_vocab is None or teacher_vocab is None:
            raise ValueError("debias=True needs student_vocab and teacher_vocab")
        ls = ls + _boundary_logprob(student_logits, s_last, boundary_token_mask(student_vocab).to(dev), Vs, temperature)
        with torch.no_grad():
            lt = lt + _boundary_logprob(t_logits, t_last, boundary_token_mask(teacher_vocab).to(dev), Vt, temperature)
    ls = ls.clamp_max(0.0)
    lt = lt.clamp_max(0.0)
    a = lt / tau - eps
    b = ls / tau - eps
    bce = -(a.exp() * b + (-torch.expm1(a)) * _log1mexp(b))
    per = torch.where(valid, bce, torch.zeros_like(bce))
    terms = _Terms(student_logits)
    terms.add(1.0, per, valid.sum())
    return terms.reduce(reduction)


def _boundary_logprob(logits, last, mask, vocab_size, temperature):
    """log P(next token starts at a boundary) at the row of each chunk's last token [B, C]."""
    B, L, _ = logits.shape
    if L == 0:
        return torch.zeros(last.shape, dtype=torch.float32, device=logits.device) + logits.sum() * 0.0
    row = last.clamp(0, L - 1)
    x = logits[torch.arange(B, device=logits.device)[:, None], row, :vocab_size].float() / temperature
    lse = torch.logsumexp(x, -1)
    lb = torch.logsumexp(x.masked_fill(~mask[:vocab_size], _NEG_INF), -1) - lse
    return torch.where(last >= 0, lb, torch.zeros_like(lb))


class ApproximateLikelihoodMatchingLoss(nn.Module):
    """Module form of :func:`alm_loss` (tau = 100 by default)."""

    def __init__(self, *, tau: float = 100.0, temperature: float = 1.0, debias: bool = False, student_vocab=None,
                 teacher_vocab=None, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.tau = _check_temperature(tau, "tau")
        self.temperature = _check_temperature(temperature)
        self.debias, self.student_vocab, self.teacher_vocab, self.reduction = debias, student_vocab, teacher_vocab, reduction
        if debias and (student_vocab is None or teacher_vocab is None):
            raise ValueError("debias=True needs student_vocab and teacher_vocab")

    def forward(self, student_logits, teacher_logits, student_ids, teacher_ids, alignment, student_mask=None,
                teacher_mask=None):
        return alm_loss(student_logits, teacher_logits, student_ids, teacher_ids, alignment,
                        student_mask=student_mask, teacher_mask=teacher_mask, tau=self.tau,
                        temperature=self.temperature, debias=self.debias, student_vocab=self.student_vocab,
                        teacher_vocab=self.teacher_vocab, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, temperature={self.temperature}, debias={self.debias}, reduction={self.reduction!r}"
