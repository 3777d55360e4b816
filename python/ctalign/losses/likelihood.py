"""Cross-tokenizer likelihood scoring (Phan, Khisti, Ullrich): the teacher's distribution over the
student's next token, exact in the subset regime (``docs/design.md``, regimes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ctalign.losses._common import (_rows_device, _NEG_INF, _ops, _check_reduction, _check_temperature,
                                    _check_logits, _check_ids, _fit, _token_mask, _check_alignment_ids,
                                    _alignment_lengths, _shifted_ce, _Terms, _teacher_rows, _is_topk,
                                    _select_rows)


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
