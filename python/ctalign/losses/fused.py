"""The losses from the student's last hidden states and output layer, never materialising its
``[B, L, V]`` logits (the chunked technique of fused linear losses).

Every loss here is, per student position, a function of one student logits row and a target that
does not depend on the student (the teacher's row in the student's terms, the realised token, ...).
So the forward pass computes the logits of ``chunk_size`` student rows at a time
(``hidden @ weight.T + bias``, then the model's logit scaling and soft-capping), evaluates the terms
whose rows lie in that chunk, and, when a gradient is wanted, differentiates the chunk's weighted
share of the final reduction with respect to its logits right away and folds it into the gradients
of the hidden states, the weight and the bias. Peak extra memory is ``O(chunk_size x V)``, not
``O(B x L x V)``; the backward pass only scales the stored gradients by the incoming scalar.

Exactness: each term's values are the unfused loss's own row functions on the same rows (the same
helpers of :mod:`ctalign.losses`), and the reductions are the unfused ones: each term's position
count is known before the sweep (likelihood: its targets are precomputed in compact form, its top
``k`` columns plus the rest; BPM / ESCD: the rows a target keeps follow from the teacher rows),
``global_mean`` sums the counts over the default process group as :class:`~ctalign.losses._common._Terms`
does. ``reduction='none'`` returns per-position values; its backward sweeps the chunks again with the
incoming per-position weights (the logits are then computed twice).

API:

* :class:`LMHead` (``weight [V, H]``, ``bias``, ``logit_scale``, ``softcap``; ``LMHead.of(model)``
  reads a transformers causal LM: its output embeddings, tied or not, ``final_logit_softcapping``,
  ``logit_scale`` and ``logits_scaling``);
* ``*_from_hidden(hidden, head, ...)``: :func:`cross_entropy_from_hidden`,
  :func:`likelihood_loss_from_hidden`, :func:`bpm_loss_from_hidden`, :func:`escd_loss_from_hidden`,
  :func:`strict_kd_loss_from_hidden`, :func:`uld_loss_from_hidden`, :func:`bld_loss_from_hidden`
  (the token CE fused; the byte head's terms from its own small logits), each with the arguments of
  its unfused twin minus the student logits, plus ``chunk_size``;
* :class:`FusedStudentHead` (``FusedStudentHead(head, loss_module)``): wraps a loss module
  (``LikelihoodDistillationLoss``, ``BPMLoss``, ``ESCDLoss``, ``StrictAlignmentKDLoss``,
  ``ULDLoss``, ``ByteLevelDistillationLoss``, or None for plain CE) and takes hidden states where the
  module takes student logits.

Not fused: ALM (its chunk log-probabilities), the teacher side (dense teacher logits or ``TopK``
rows, as the unfused losses take them).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ctalign.losses._common import (_NEG_INF, _check_reduction, _check_ids, _fit, _token_mask,
                                    _check_target_ids, _Terms, _teacher_rows, _is_topk, _select_rows, _rows_device,
                                    _check_logits)

from ctalign.losses.fused_head import (LMHead, _acc, _ce_term, _check_hidden, _chunk, _float, _Plan, _prepare,
                                      _rows_of, _run, _Term, default_chunk_size)

__all__ = ["LMHead", "FusedStudentHead", "cross_entropy_from_hidden", "likelihood_loss_from_hidden",
           "bpm_loss_from_hidden", "escd_loss_from_hidden", "strict_kd_loss_from_hidden", "uld_loss_from_hidden",
           "bld_loss_from_hidden", "default_chunk_size"]


# ---- plain cross-entropy ----------------------------------------------------------------------------
def cross_entropy_from_hidden(hidden, head, ids, *, mask=None, lengths=None, vocab_size: int | None = None,
                              reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """:func:`ctalign.losses.cross_entropy` from the last hidden states ``[B, L, H]`` and the output
    layer (an :class:`LMHead`, ``nn.Linear``, weight tensor or a transformers model)."""
    _check_reduction(reduction)
    head = LMHead.of(head)
    B, Ls, V = _check_hidden(hidden, head, vocab_size)
    dev = hidden.device
    ids = _check_ids(ids, "ids", (B, Ls), V).to(dev)
    target = _token_mask(mask, lengths, (B, Ls), dev)
    plan = _Plan([_ce_term(1.0, ids, target, V, Ls)], B, Ls, reduction, _chunk(chunk_size, head), dev)
    return _run(plan, head, hidden)


# ---- likelihood -------------------------------------------------------------------------------------
def likelihood_loss_from_hidden(hidden, head, teacher_logits, student_ids, alignment, amap, *, student_mask=None,
                                kl_weight: float = 0.8, ce_weight: float = 0.2, top_k: int | None = 64,
                                temperature: float = 1.0, reduction: str = "mean", targets="exact",
                                chunk_size: int | None = None, target_chunk: int = 512) -> torch.Tensor:
    """:func:`ctalign.losses.likelihood_distillation_loss` from hidden states and the output layer.

    The targets are built once, ``target_chunk`` positions at a time, and kept as their top
    ``top_k`` columns and the rest (what the KL reads: ``O(positions x top_k)``); with ``top_k``
    None (dense KL) they are built twice (once to count the positions that have one)."""
    from ctalign.losses.likelihood import LikelihoodTargets, _TargetPlan, _check_targets, _kl_rows
    head, temperature, B, Ls, Vs, dev, ids, target = _prepare(hidden, head, student_ids, alignment, student_mask,
                                                              reduction, temperature, amap.n_student)
    terms = [_ce_term(ce_weight, ids, target, Vs, Ls)]
    if kl_weight != 0.0 and Ls > 1:
        if isinstance(targets, LikelihoodTargets):
            tl, tvalid = targets.logprobs.to(dev), targets.valid.to(dev)
            if tuple(tl.shape[:2]) != (B, Ls):
                raise ValueError(f"targets are for shape {tuple(tl.shape[:2])}, student logits {(B, Ls)}")
            pos = tvalid & target
            pos[:, 0] = False
            rows_of = lambda b_, j_: tl[b_, j_]  # noqa: E731
        else:
            plan = _TargetPlan(teacher_logits, amap, alignment, Ls, _check_targets(targets))
            pos = plan.has_target.to(dev) & target
            pos[:, 0] = False
            rows_of = lambda b_, j_: plan.rows(b_.to(plan.device), j_.to(plan.device), temperature).to(dev)  # noqa
        qb_all, qj_all = torch.nonzero(pos, as_tuple=True)
        dense = top_k is None or top_k >= Vs
        parts = []
        for lo in range(0, qb_all.numel(), target_chunk):
            b_, j_ = qb_all[lo:lo + target_chunk], qj_all[lo:lo + target_chunk]
            t = rows_of(b_, j_)[:, :Vs].float()
            good = torch.isfinite(t).any(-1)
            b_, j_, t = b_[good], j_[good], t[good]
            if dense:
                parts.append((b_, j_, None, None, None))
                continue
            t = t - torch.logsumexp(t, -1, keepdim=True)
            lp_top, idx = torch.topk(t, top_k, -1)
            rest = (1.0 - lp_top.exp().sum(-1)).clamp_min(0.0)
            parts.append((b_, j_, lp_top, idx, rest))
        qb = torch.cat([p[0] for p in parts]) if parts else qb_all[:0]
        qj = torch.cat([p[1] for p in parts]) if parts else qj_all[:0]
        if dense:
            def fn(x, local, e):
                t = rows_of(qb[e], qj[e])[:, :Vs].float()
                t = t - torch.logsumexp(t, -1, keepdim=True)
                s = torch.log_softmax(_float(_rows_of(x, local)[:, :Vs]) / temperature, -1)
                return _kl_rows(t, s, top_k)
        else:
            k_ = min(top_k, Vs)
            lp_top = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, k_, device=dev)
            idx = torch.cat([p[3] for p in parts]) if parts else torch.zeros(0, k_, dtype=torch.long, device=dev)
            rest = torch.cat([p[4] for p in parts]) if parts else torch.zeros(0, device=dev)

            def fn(x, local, e):
                s = torch.log_softmax(_float(_rows_of(x, local)[:, :Vs]) / temperature, -1)
                return _kl_topk(lp_top[e], idx[e], rest[e], s)
        terms.append(_Term(kl_weight, qb * Ls + qj - 1, qb, qj, qb.numel(), fn))
    plan_ = _Plan(terms, B, Ls, reduction, _chunk(chunk_size, head), dev)
    return _run(plan_, head, hidden)


def _kl_topk(lp_top, idx, rest_p, student_lp):
    """``likelihood._kl_rows`` with the target's top k taken beforehand (the same operations)."""
    p_top = lp_top.exp()
    q_top = student_lp.gather(-1, idx)
    kl = torch.where(p_top > 0, p_top * (lp_top - q_top), torch.zeros_like(p_top)).sum(-1)
    rest_q_lp = torch.logsumexp(student_lp.scatter(-1, idx, _NEG_INF), -1)
    rest_lp = torch.log(rest_p.clamp_min(1e-30))
    return kl + torch.where(rest_p > 1e-7, rest_p * (rest_lp - rest_q_lp), torch.zeros_like(rest_p))


# ---- BPM and ESCD -----------------------------------------------------------------------------------
def _bpm_root_term(weight, teacher_logits, amap, alignment, ids, target, kept, temperature, residual, Ls, dev,
                   targets=None, target_chunk: int = 512):
    """BPM's root term as a _Term, with the positions whose target is kept known up front."""
    from ctalign import ops
    from ctalign.losses.bpm import BPMTargets, _BPMPlan, _kl_columns, _residual_dropped, _tables
    drop = _residual_dropped(amap, residual)
    pg, t_tab, s_tab, _ = _tables(amap)
    Vs, Vt = amap.n_student, amap.n_teacher
    plan = None
    if isinstance(targets, BPMTargets):
        tl, tvalid = targets.logprobs.to(dev), targets.valid.to(dev)
        if tuple(tl.shape[:2]) != (ids.shape[0], Ls):
            raise ValueError(f"targets are for shape {tuple(tl.shape[:2])}, student logits {(ids.shape[0], Ls)}")
        pos = tvalid & target & kept
        pos[:, 0] = False
        rows_of = lambda b_, j_: tl[b_, j_]  # noqa: E731
    else:
        plan = _BPMPlan(teacher_logits, amap, alignment, Ls)
        pos = plan.has_target.to(dev) & target & kept
        pos[:, 0] = False
        rows_of = lambda b_, j_: plan.rows(b_.to(plan.device), j_.to(plan.device), temperature).to(dev)  # noqa
    qb, qj = torch.nonzero(pos, as_tuple=True)
    # which rows the target keeps (_kl_columns' keep): a finite column (drop: a finite non-residual column)
    keep = torch.zeros(qb.numel(), dtype=torch.bool, device=dev)
    nonres = torch.from_numpy(pg.group != pg.n_student)
    for lo in range(0, qb.numel(), target_chunk):
        b_, j_ = qb[lo:lo + target_chunk], qj[lo:lo + target_chunk]
        if plan is None:
            t = rows_of(b_, j_)
            k = torch.isfinite(t[:, :-1] if drop else t).any(-1)
        else:
            rows = _select_rows(plan.teacher_rows, plan.flat_row[b_.to(plan.device), j_.to(plan.device)])
            if _is_topk(rows):
                fin = torch.isfinite(rows.logprobs)
                if drop:
                    fin = fin & nonres.to(fin.device)[rows.indices.long().clamp(0, Vt - 1)]
            else:
                fin = torch.isfinite(rows[:, :Vt])
                if drop:
                    fin = fin & nonres.to(fin.device)[None, :]
            k = fin.any(-1).to(dev)
        keep[lo:lo + target_chunk] = k
    qb, qj = qb[keep], qj[keep]

    def fn(x, local, e):
        t = rows_of(qb[e], qj[e])
        s = ops._grouped("bpm_student", _rows_of(x, local), Vs, "the map's student vocabulary", s_tab, Vs + 1,
                         temperature)
        if t.shape[0] == 1:
            # _kl_columns' batched dot takes another (less exact) path for a batch of one row than for
            # the unfused loss's batches: duplicated, the row's value is the unfused one
            v, k = (r[:1] for r in _kl_columns(torch.cat([t, t]), torch.cat([s, s]), drop))
        else:
            v, k = _kl_columns(t, s, drop)
        if not bool(k.all()):
            raise RuntimeError("fused BPM: a kept target row met a student row with no mass outside the residual "
                               "(underflow); use the unfused bpm_loss for these logits")
        return v
    return _Term(weight, qb * Ls + qj - 1, qb, qj, qb.numel(), fn), plan, (qb, qj)


def bpm_loss_from_hidden(hidden, head, teacher_logits, student_ids, alignment, amap, *, student_mask=None,
                         row_mask=None, mask_whitespace: bool = True, kl_weight: float = 1.0, ce_weight: float = 0.0,
                         temperature: float = 1.0, residual: str = "match", reduction: str = "mean", targets=None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """:func:`ctalign.losses.bpm_loss` from hidden states and the output layer."""
    from ctalign.losses.bpm import _check_residual
    from ctalign.losses.row_masks import _kept_rows
    _check_residual(residual)
    head, temperature, B, Ls, Vs, dev, ids, target = _prepare(hidden, head, student_ids, alignment, student_mask,
                                                              reduction, temperature, amap.n_student)
    terms = [_ce_term(ce_weight, ids, target, Vs, Ls)]
    if kl_weight != 0.0 and Ls > 1:
        kept = _kept_rows(ids, amap, (B, Ls), dev, row_mask, mask_whitespace)
        terms.append(_bpm_root_term(kl_weight, teacher_logits, amap, alignment, ids, target, kept, temperature,
                                    residual, Ls, dev, targets)[0])
    return _run(_Plan(terms, B, Ls, reduction, _chunk(chunk_size, head), dev), head, hidden)


def _escd_child_entries(plan, amap, ids, qb, qj, temperature, dev, chunk: int = 256):
    """ESCD's child events at root positions (qb, qj): per event its query (index into qb), teacher
    mass and completion range of the student byte trie (the teacher side of ``escd._child_chunk``)."""
    from ctalign.losses.escd import _group_members
    from ctalign.ops.reference import tempered_logprobs
    Vt, Vs = amap.n_teacher, amap.n_student
    tdev = plan.device
    tab = _group_members(amap, tdev)
    out_q, out_m, out_lo, out_hi = [], [], [], []
    for lo_ in range(0, qb.numel(), chunk):
        b_, j_ = qb[lo_:lo_ + chunk].to(tdev), qj[lo_:lo_ + chunk].to(tdev)
        g = tab["rep"][ids.to(tdev)[b_, j_].clamp(0, Vs - 1)]
        flat = plan.flat_row[b_, j_]
        with torch.no_grad():
            sel = _select_rows(plan.teacher_rows, flat)
            if _is_topk(sel):
                idx = sel.indices.long()
                lp = tempered_logprobs(sel.logprobs.double(), temperature)
                mine = tab["ok"][idx] & (tab["group"][idx] == g[:, None])
                ei, ek = torch.nonzero(mine, as_tuple=True)
                ent_t, ent_lp = idx[ei, ek], lp[ei, ek]
            else:
                x = sel[:, :Vt].double() / temperature
                lse = torch.logsumexp(x, -1)
                start, stop = tab["ptr"][g], tab["ptr"][g + 1]
                count = stop - start
                ei = torch.repeat_interleave(torch.arange(len(g), device=tdev), count)
                first = torch.cumsum(count, 0) - count
                ent_t = tab["ids"][start[ei] + torch.arange(len(ei), device=tdev) - first[ei]]
                ent_lp = x[ei, ent_t] - lse[ei]
        out_q.append((ei + lo_).to(dev))
        out_m.append(ent_lp.exp().to(dev))
        out_lo.append(tab["lo"][ent_t].to(dev, torch.int32))
        out_hi.append(tab["hi"][ent_t].to(dev, torch.int32))
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt, device=dev)  # noqa: E731
    return cat(out_q, torch.long), cat(out_m, torch.float64), cat(out_lo, torch.int32), cat(out_hi, torch.int32)


def escd_loss_from_hidden(hidden, head, teacher_logits, student_ids, alignment, amap, *, student_mask=None,
                          row_mask=None, mask_whitespace: bool = True, root_weight: float = 1.0,
                          child_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
                          residual: str = "match", reduction: str = "mean",
                          chunk_size: int | None = None) -> torch.Tensor:
    """:func:`ctalign.losses.escd_loss` from hidden states and the output layer (the child term reads
    student row ``j`` of root position ``j``, the root term row ``j - 1``)."""
    from ctalign import ops
    from ctalign.losses.bpm import _check_residual, _tables, _LOG_FLOOR
    from ctalign.losses.escd import _child_positions
    from ctalign.losses.row_masks import _kept_rows
    _check_residual(residual)
    head, temperature, B, Ls, Vs, dev, ids, target = _prepare(hidden, head, student_ids, alignment, student_mask,
                                                              reduction, temperature, amap.n_student)
    terms = [_ce_term(ce_weight, ids, target, Vs, Ls)]
    if (root_weight != 0.0 or child_weight != 0.0) and Ls > 1:
        kept = _kept_rows(ids, amap, (B, Ls), dev, row_mask, mask_whitespace)
        root, plan, (rb, rj) = _bpm_root_term(root_weight, teacher_logits, amap, alignment, ids, target, kept,
                                              temperature, residual, Ls, dev)
        terms.append(root)
        n = rb.numel()
        if child_weight != 0.0:
            used = torch.zeros(B, Ls, dtype=torch.bool, device=dev)
            used[rb, rj] = True
            cb, cj = torch.nonzero(_child_positions(plan, used.to(plan.device)).to(dev), as_tuple=True)
            eq, em, elo, ehi = _escd_child_entries(plan, amap, ids, cb, cj, temperature, dev)
            has = torch.zeros(cb.numel(), dtype=torch.bool, device=dev)
            has[eq] = True
            # positions with at least one event; events regrouped by position (CSR)
            newq = torch.cumsum(has.long(), 0) - 1
            eq = newq[eq]
            cb, cj = cb[has], cj[has]
            ptr = torch.zeros(cb.numel() + 1, dtype=torch.long, device=dev)
            ptr[1:] = torch.cumsum(torch.bincount(eq, minlength=cb.numel()), 0)
            s_trie = _tables(amap)[3]

            def fn(x, local, e):
                # events of the positions e (e: a slice or index tensor of positions)
                pos_ids = torch.arange(cb.numel(), device=dev)[e]
                cnt = ptr[pos_ids + 1] - ptr[pos_ids]
                ev = torch.repeat_interleave(ptr[pos_ids], cnt) + (
                    torch.arange(int(cnt.sum()), device=dev) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt))
                which = torch.repeat_interleave(torch.arange(pos_ids.numel(), device=dev), cnt)
                acc = _acc(x)
                logc = ops._ranges("escd_child", x, Vs, "the map's student vocabulary", s_trie, local[which],
                                   elo[ev][:, None], ehi[ev][:, None], temperature)[:, 0]
                terms_ = -em[ev].to(acc) * logc.to(acc).clamp_min(_LOG_FLOOR)
                return torch.zeros(pos_ids.numel(), dtype=acc, device=dev).index_add(0, which, terms_)
            terms.append(_Term(child_weight, cb * Ls + cj, cb, cj, n, fn))
    return _run(_Plan(terms, B, Ls, reduction, _chunk(chunk_size, head), dev), head, hidden)


# ---- strict-alignment KD ----------------------------------------------------------------------------
def strict_kd_loss_from_hidden(hidden, head, teacher_logits, student_ids, alignment, amap, *, student_mask=None,
                               row_mask=None, mask_whitespace: bool = False, top_k: int | None = 16,
                               kd_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
                               teacher_floor: float = 1e-12, reduction: str = "mean",
                               chunk_size: int | None = None) -> torch.Tensor:
    """:func:`ctalign.losses.strict_kd_loss` from hidden states and the output layer."""
    from ctalign import ops
    from ctalign.losses.row_masks import _kept_rows
    from ctalign.losses.strict_kd import _reverse_kl, _shared_tables, strict_positions
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if not (0.0 < float(teacher_floor) < 1.0):
        raise ValueError(f"teacher_floor must be in (0, 1), got {teacher_floor}")
    head, temperature, B, Ls, Vs, dev, ids, target = _prepare(hidden, head, student_ids, alignment, student_mask,
                                                              reduction, temperature, amap.n_student)
    terms = [_ce_term(ce_weight, ids, target, Vs, Ls)]
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
        qb, qj = torch.nonzero(pos, as_tuple=True)
        flat = (qb * Lt + trow[qb, qj]).to(tdev)
        k = None if top_k is None else int(top_k)

        def fn(x, local, e):
            with torch.no_grad():
                t_lp = ops._grouped("strict_kd_teacher", _select_rows(rows, flat[e]), amap.n_teacher,
                                    "the map's teacher vocabulary", t_tab, K + 1, temperature).to(dev)
            s_lp = ops._grouped("strict_kd_student", _rows_of(x, local), Vs, "the map's student vocabulary", s_tab,
                                K + 1, temperature)
            return _reverse_kl(s_lp, t_lp, K, k, float(teacher_floor))
        terms.append(_Term(kd_weight, qb * Ls + qj - 1, qb, qj, qb.numel(), fn))
    return _run(_Plan(terms, B, Ls, reduction, _chunk(chunk_size, head), dev), head, hidden)


# ---- ULD --------------------------------------------------------------------------------------------
def uld_loss_from_hidden(hidden, head, teacher_logits, student_ids, *, alignment=None, student_mask=None,
                         teacher_mask=None, align: str = "positional", uld_weight: float = 1.0,
                         ce_weight: float = 1.0, top_k: int | None = None, temperature: float = 1.0,
                         student_vocab_size: int | None = None, teacher_vocab_size: int | None = None,
                         reduction: str = "mean", distance_mean: str = "pairs", ce_mask=None,
                         student_temperature: float | None = None, teacher_temperature: float | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """:func:`ctalign.losses.uld_loss` from hidden states and the output layer (the same pairs, sorted
    or top-k probabilities, tails and conventions)."""
    from ctalign.losses.uld import _compiled_topk_applies, _compiled_topk_distances, _row_distances, _setup
    _check_reduction(reduction)
    head = LMHead.of(head)
    B, Ls, Vs = _check_hidden(hidden, head, student_vocab_size)
    dev = hidden.device
    su = _setup(teacher_logits, student_ids, alignment, student_mask, teacher_mask, ce_mask, align=align, top_k=top_k,
                temperature=temperature, student_temperature=student_temperature,
                teacher_temperature=teacher_temperature, distance_mean=distance_mean,
                teacher_vocab_size=teacher_vocab_size, B=B, Ls=Ls, Vs=Vs, dev=dev)
    ids, ((sb, sj), (tb, tk)) = su.ids, su.pairs
    terms = []
    if ce_weight != 0.0:
        terms.append(_ce_term(ce_weight, ids, su.ce_t, Vs, Ls))
    elif su.ce_t[:, 1:].any():
        _check_target_ids(ids, Vs, su.ce_t)
    if uld_weight != 0.0 and sb.numel():
        compiled = _compiled_topk_applies(su, Vs, hidden, teacher_logits)
        t_rows, _, _ = _teacher_rows(teacher_logits)
        t_flat = (tb * su.Lt + (tk - 1)).to(_rows_device(t_rows))

        def fn(x, local, e):
            if compiled:
                return _compiled_topk_distances(su, x, local, x.shape[0], teacher_logits, t_rows, t_flat[e], Vs, dev)
            return _row_distances(su, _rows_of(x, local)[:, :Vs], _select_rows(t_rows, t_flat[e]), Vs,
                                  (sb[e], sj[e] - 1), (tb[e], tk[e] - 1), Ls, dev)
        if distance_mean == "examples":
            per_example = torch.bincount(sb, minlength=B).float()
            factor = 1.0 / per_example.clamp_min(1)[sb]
            count = int((per_example > 0).sum())
        else:
            factor, count = None, sb.numel()
        terms.append(_Term(uld_weight, sb * Ls + sj - 1, sb, sj, count, fn, factor))
    return _run(_Plan(terms, B, Ls, reduction, _chunk(chunk_size, head), dev), head, hidden)


# ---- BLD --------------------------------------------------------------------------------------------
def bld_loss_from_hidden(hidden, head, head_logits, teacher_logits, student_ids, alignment, *, student_vocab,
                         teacher_vocab, student_mask=None, lambda_b: float = 1.0, lambda_kl: float = 0.1,
                         ce_weight: float = 1.0, temperature: float = 1.0, reduction: str = "mean",
                         targets: str = "exact", chunk_size: int | None = None) -> torch.Tensor:
    """:func:`ctalign.losses.byte_level_distillation_loss` with its token CE from hidden states and
    the output layer; the byte head's terms (``head_logits [B, Ls, K, 257]``, small) as unfused."""
    from ctalign.losses.bld import _add_byte_head_terms, _check_byte_targets
    _check_byte_targets(targets)
    head, temperature, B, Ls, Vs, dev, ids, target = _prepare(hidden, head, student_ids, alignment, student_mask,
                                                              reduction, temperature, len(student_vocab))
    if head_logits.dim() != 4 or tuple(head_logits.shape[:2]) != (B, Ls) or head_logits.shape[-1] != 257:
        raise ValueError(f"head logits must be [batch, length, K, 257] with batch, length = {(B, Ls)}, "
                         f"got {tuple(head_logits.shape)}")
    extra = _Terms(head_logits)
    _add_byte_head_terms(extra, head_logits, teacher_logits, ids, target, alignment, student_vocab=student_vocab,
                         teacher_vocab=teacher_vocab, lambda_b=lambda_b, lambda_kl=lambda_kl,
                         temperature=temperature, targets=targets)
    plan = _Plan([_ce_term(ce_weight, ids, target, Vs, Ls)], B, Ls, reduction, _chunk(chunk_size, head), dev)
    return _run(plan, head, hidden, extra)


# ---- the module wrapper -----------------------------------------------------------------------------
class FusedStudentHead(nn.Module):
    """``FusedStudentHead(head, loss)``: the ctalign loss module ``loss`` computed from the student's
    last hidden states and output layer ``head`` (:class:`LMHead`, ``nn.Linear``, a transformers
    model, or a weight tensor) instead of its logits. ``forward(hidden, *args, **kwargs)`` takes what
    ``loss.forward`` takes, with ``hidden [B, L, H]`` in place of the student logits. ``loss`` None:
    plain next-token cross-entropy ``forward(hidden, ids, mask=None)``."""

    def __init__(self, head, loss: nn.Module | None = None, *, chunk_size: int | None = None,
                 reduction: str | None = None):
        super().__init__()
        self._head = head
        self.loss = loss
        self.chunk_size = chunk_size
        self.reduction = reduction if reduction is not None else getattr(loss, "reduction", "mean")
        _check_reduction(self.reduction)

    @property
    def head(self) -> LMHead:
        return LMHead.of(self._head)

    def forward(self, hidden, *args, **kwargs):
        from ctalign.losses.bld import ByteLevelDistillationLoss
        from ctalign.losses.bpm import BPMLoss
        from ctalign.losses.escd import ESCDLoss
        from ctalign.losses.likelihood import LikelihoodDistillationLoss
        from ctalign.losses.strict_kd import StrictAlignmentKDLoss
        from ctalign.losses.uld import ULDLoss
        m, head, red, cs = self.loss, self.head, self.reduction, self.chunk_size
        if m is None:
            ids = args[0] if args else kwargs.pop("ids")
            mask = args[1] if len(args) > 1 else kwargs.pop("mask", None)
            return cross_entropy_from_hidden(hidden, head, ids, mask=mask, reduction=red, chunk_size=cs, **kwargs)
        names = {
            LikelihoodDistillationLoss: ("teacher_logits", "student_ids", "alignment", "student_mask"),
            BPMLoss: ("teacher_logits", "student_ids", "alignment", "student_mask", "row_mask"),
            ESCDLoss: ("teacher_logits", "student_ids", "alignment", "student_mask", "row_mask"),
            StrictAlignmentKDLoss: ("teacher_logits", "student_ids", "alignment", "student_mask", "row_mask"),
            ULDLoss: ("teacher_logits", "student_ids", "alignment", "student_mask", "teacher_mask", "ce_mask"),
            ByteLevelDistillationLoss: ("head_logits", "teacher_logits", "student_ids", "alignment",
                                          "student_mask"),
        }
        kind = type(m)
        if kind not in names:
            raise TypeError(f"FusedStudentHead has no fused form of {kind.__name__}")
        a = dict(zip(names[kind], args))
        a.update(kwargs)
        if kind is LikelihoodDistillationLoss:
            return likelihood_loss_from_hidden(hidden, head, a.pop("teacher_logits"), a.pop("student_ids"),
                                               a.pop("alignment"), m.amap, kl_weight=m.kl_weight,
                                               ce_weight=m.ce_weight, top_k=m.top_k, temperature=m.temperature,
                                               reduction=red, targets=m.targets, chunk_size=cs, **a)
        if kind is BPMLoss:
            return bpm_loss_from_hidden(hidden, head, a.pop("teacher_logits"), a.pop("student_ids"),
                                        a.pop("alignment"), m.amap, mask_whitespace=m.mask_whitespace,
                                        kl_weight=m.kl_weight, ce_weight=m.ce_weight, temperature=m.temperature,
                                        residual=m.residual, reduction=red, chunk_size=cs, **a)
        if kind is ESCDLoss:
            return escd_loss_from_hidden(hidden, head, a.pop("teacher_logits"), a.pop("student_ids"),
                                         a.pop("alignment"), m.amap, mask_whitespace=m.mask_whitespace,
                                         root_weight=m.root_weight, child_weight=m.child_weight,
                                         ce_weight=m.ce_weight, temperature=m.temperature, residual=m.residual,
                                         reduction=red, chunk_size=cs, **a)
        if kind is StrictAlignmentKDLoss:
            return strict_kd_loss_from_hidden(hidden, head, a.pop("teacher_logits"), a.pop("student_ids"),
                                              a.pop("alignment"), m.amap, mask_whitespace=m.mask_whitespace,
                                              top_k=m.top_k, kd_weight=m.kd_weight, ce_weight=m.ce_weight,
                                              temperature=m.temperature, teacher_floor=m.teacher_floor,
                                              reduction=red, chunk_size=cs, **a)
        if kind is ULDLoss:
            return uld_loss_from_hidden(hidden, head, a.pop("teacher_logits"), a.pop("student_ids"), align=m.align,
                                        uld_weight=m.uld_weight, ce_weight=m.ce_weight, top_k=m.top_k,
                                        temperature=m.temperature, student_vocab_size=m.student_vocab_size,
                                        teacher_vocab_size=m.teacher_vocab_size, reduction=red,
                                        distance_mean=m.distance_mean, student_temperature=m.student_temperature,
                                        teacher_temperature=m.teacher_temperature, chunk_size=cs, **a)
        if a.get("head_logits") is not None and a["head_logits"].dim() == 4 and a["head_logits"].shape[2] != m.num_bytes:
            raise ValueError(f"head predicts {a['head_logits'].shape[2]} bytes, the loss expects {m.num_bytes}")
        return bld_loss_from_hidden(hidden, head, a.pop("head_logits"), a.pop("teacher_logits"), a.pop("student_ids"),
                                    a.pop("alignment"), student_vocab=m.student_vocab, teacher_vocab=m.teacher_vocab,
                                    lambda_b=m.lambda_b, lambda_kl=m.lambda_kl, ce_weight=m.ce_weight,
                                    temperature=m.temperature, reduction=red, targets=m.targets, chunk_size=cs, **a)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, reduction={self.reduction!r}"
