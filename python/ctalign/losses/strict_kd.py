"""Strict-alignment KD (arXiv 2610.08448): reverse KL at strictly 1:1-aligned positions only, over the
shared vocabulary, renormalised, restricted to the student's top 16 entries.

Definitions:

* **Positions.** Student token ``j`` is strictly aligned when its chunk (``alignment.s_chunk``: the
  span between two common boundaries) holds exactly one student and one teacher token, and a
  teacher row predicts that teacher token (``s_teacher_row[j] >= 0``). Both models then condition on
  the same text and predict a token spelling the same bytes; student row ``j - 1`` is compared with
  teacher row ``k - 1``. Misaligned spans get no supervision (the paper: adding it hurt in all 18
  of its configurations).
* **Shared vocabulary.** The byte strings that are tokens of both vocabularies (the map's
  ``identical`` pairs). Each side's mass of a shared string sums its ids with those bytes (e.g.
  SentencePiece's ``▁`` and ``<0x20>``); both come from the grouped kernel (the student's with its
  backward), one column per string.
* **Divergence.** Let ``S`` be the ``top_k`` (default 16) shared strings with the most student mass
  at the row (``top_k=None``: all of them). Both sides are renormalised over ``S`` and
  ``KL(student || teacher) = sum_{s in S} q(s) (log q(s) - log p(s))`` (reverse KL; the choice of
  ``S`` carries no gradient). At temperature ``T`` on both sides, no ``T**2``. A teacher mass of zero
  (a ``TopK`` row that did not keep the string, or float32 underflow) is floored at
  ``teacher_floor`` (1e-12) before the renormalisation, so the loss stays finite.
* **Row masks.** ``row_mask`` and ``mask_whitespace`` (default False: the paper does not use it)
  as in ``row_masks``.

Loss: ``kd_weight x reverse KL + ce_weight x CE`` (defaults 1 and 0), conventions of
``ctalign.losses``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ctalign.losses._common import (_Terms, _fit, _shifted_ce, _teacher_rows, _is_topk, _select_rows, _rows_device,
                                    _check_logits, _check_reduction, _check_temperature)
from ctalign.losses.bpm import _prepare, _acc_dtype
from ctalign.losses.row_masks import _kept_rows


def _shared_tables(amap):
    """(teacher group, student group) _Tables mapping ids to shared-string columns [0, K), K = other; and K."""
    from ctalign.ops._tables import _Tables
    from ctalign.prefix_groups import prefix_groups
    store = amap.__dict__.setdefault("_ctalign_prefix_groups", {})
    if "shared" not in store:
        pg = prefix_groups(amap)
        pairs = np.asarray(amap.identical).reshape(-1, 2).astype(np.int64)
        keys = np.unique(pg.rep[pairs[:, 1]]) if len(pairs) else np.zeros(0, np.int64)
        K = len(keys)
        col_of_rep = np.full(amap.n_student, K, dtype=np.int64)
        col_of_rep[keys] = np.arange(K)
        s_group = col_of_rep[pg.rep]
        t_group = np.full(amap.n_teacher, K, dtype=np.int64)
        if len(pairs):
            t_group[pairs[:, 0]] = col_of_rep[pg.rep[pairs[:, 1]]]
        t = _Tables({"group": torch.from_numpy(t_group.astype(np.int32))}, n=amap.n_teacher)
        s = _Tables({"group": torch.from_numpy(s_group.astype(np.int32))}, n=amap.n_student)
        store["shared"] = (t, s, K)
    return store["shared"]


def strict_positions(alignment, amap=None, Ls: int | None = None) -> torch.Tensor:
    """bool ``[B, Ls]``: the strictly 1:1-aligned student tokens that a teacher row predicts: a chunk
    of one student and one teacher token that are the same string (an ``identical`` pair, compared
    through the map when given and the alignment holds the ids, else by equal dummy-prefix leads:
    SentencePiece's ``▁The`` against ``The`` at a text's start is 1:1 but no shared string), or a
    matched special."""
    Ls = alignment.s_chunk.shape[1] if Ls is None else int(Ls)
    ch = _fit(alignment.s_chunk, Ls, -1).long()
    sc, tc = alignment.chunk_s_count, alignment.chunk_t_count
    if sc.shape[1] == 0:
        return torch.zeros(ch.shape, dtype=torch.bool)
    c = ch.clamp(0, sc.shape[1] - 1)
    one = (sc.gather(1, c) == 1) & (tc.gather(1, c) == 1)
    tt = _fit(alignment.s_teacher_token, Ls, -1).long()
    Lt = alignment.t_lead.shape[1]
    k = tt.clamp(0, max(Lt - 1, 0))
    special = _fit(alignment.s_role, Ls, 0) != 0
    if amap is not None and alignment.teacher_ids is not None and alignment.student_ids is not None and Lt:
        t_tab, s_tab, K = _shared_tables(amap)
        tid = alignment.teacher_ids.long().gather(1, k).clamp(0, amap.n_teacher - 1)
        sid = _fit(alignment.student_ids.long(), Ls, 0).clamp(0, amap.n_student - 1)
        tcol, scol = t_tab.on(tid.device)["group"].long()[tid], s_tab.on(sid.device)["group"].long()[sid]
        same = (tcol == scol) & (scol < K)
    elif Lt:
        same = _fit(alignment.s_lead, Ls, 0) == alignment.t_lead.gather(1, k)
    else:
        same = torch.zeros_like(one)
    return (ch >= 0) & one & (same | special) & (tt >= 0) & (_fit(alignment.s_teacher_row, Ls, -1) >= 0)


def _reverse_kl(s_lp: torch.Tensor, t_lp: torch.Tensor, K: int, top_k: int | None, floor: float) -> torch.Tensor:
    acc = torch.float64 if s_lp.dtype == torch.float64 else torch.float32
    s, t = s_lp[:, :K].to(acc), t_lp[:, :K].to(acc).clamp_min(math.log(floor))
    if top_k is not None and top_k < K:
        idx = torch.topk(s.detach(), top_k, -1).indices
        s, t = s.gather(1, idx), t.gather(1, idx)
    s = torch.log_softmax(s.clamp_min(-1e4), -1)  # a -inf student column keeps q = 0 without NaN
    t = torch.log_softmax(t, -1)
    q = s.exp()
    return (q * (s - t)).sum(-1)


def strict_kd_loss(student_logits: torch.Tensor, teacher_logits, student_ids, alignment, amap, *,
                   student_mask=None, row_mask=None, mask_whitespace: bool = False, top_k: int | None = 16,
                   kd_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
                   teacher_floor: float = 1e-12, reduction: str = "mean", chunk_size: int = 512) -> torch.Tensor:
    """Strict-alignment KD (module docstring): reverse KL over the shared vocabulary at strictly
    1:1-aligned positions, the student's ``top_k`` shared strings (``None``: all), renormalised."""
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if not (0.0 < float(teacher_floor) < 1.0):
        raise ValueError(f"teacher_floor must be in (0, 1), got {teacher_floor}")
    temperature, Vs, B, Ls, dev, ids, target = _prepare(student_logits, student_ids, alignment, amap,
                                                        student_mask, reduction, temperature)
    from ctalign import ops
    terms = _Terms(student_logits)
    terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, target), target.sum())
    kd = student_logits.new_zeros((B, Ls), dtype=_acc_dtype(student_logits))
    n = 0
    if kd_weight != 0.0 and Ls > 1:
        t_tab, s_tab, K = _shared_tables(amap)
        rows, tB, Lt = _teacher_rows(teacher_logits)
        if not _is_topk(teacher_logits):
            _check_logits(teacher_logits, "teacher logits", amap.n_teacher)
        if tB != B:
            raise ValueError(f"teacher logits have {tB} rows, student logits {B}")
        tdev = _rows_device(rows)
        trow = _fit(alignment.s_teacher_row.to(dev), Ls, -1)
        if bool((trow >= Lt).any()):
            raise ValueError(f"alignment refers to teacher position {int(trow.max())}, teacher logits have {Lt}")
        kept = _kept_rows(ids, amap, (B, Ls), dev, row_mask, mask_whitespace)
        pos = strict_positions(alignment, amap, Ls).to(dev) & target & kept
        pos[:, 0] = False
        if K == 0:
            pos[:] = False
        qb_all, qj_all = torch.nonzero(pos, as_tuple=True)
        k = None if top_k is None else int(top_k)
        for lo in range(0, qb_all.numel(), chunk_size):
            qb, qj = qb_all[lo:lo + chunk_size], qj_all[lo:lo + chunk_size]
            flat = (qb * Lt + trow[qb, qj]).to(tdev)
            with torch.no_grad():
                t_lp = ops._grouped("strict_kd_teacher", _select_rows(rows, flat), amap.n_teacher,
                                    "the map's teacher vocabulary", t_tab, K + 1, temperature).to(dev)
            s_lp = ops._grouped("strict_kd_student", student_logits[qb, qj - 1], Vs, "the map's student vocabulary",
                                s_tab, K + 1, temperature)
            v = _reverse_kl(s_lp, t_lp, K, k, float(teacher_floor))
            kd = kd.index_put((qb, qj), v, accumulate=True)
            n += qb.numel()
    terms.add(kd_weight, kd, n)
    return terms.reduce(reduction)


class StrictAlignmentKDLoss(nn.Module):
    """Module form of :func:`strict_kd_loss` for one alignment map."""

    def __init__(self, amap, *, top_k: int | None = 16, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 temperature: float = 1.0, teacher_floor: float = 1e-12, mask_whitespace: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.amap, self.top_k = amap, top_k
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.temperature = _check_temperature(temperature)
        self.teacher_floor, self.mask_whitespace, self.reduction = teacher_floor, bool(mask_whitespace), reduction

    def forward(self, student_logits, teacher_logits, student_ids, alignment, student_mask=None, row_mask=None):
        return strict_kd_loss(student_logits, teacher_logits, student_ids, alignment, self.amap,
                              student_mask=student_mask, row_mask=row_mask, mask_whitespace=self.mask_whitespace,
                              top_k=self.top_k, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                              temperature=self.temperature, teacher_floor=self.teacher_floor,
                              reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"temperature={self.temperature}, mask_whitespace={self.mask_whitespace}")
