"""Cross-tokenizer likelihood scoring (Phan, Khisti, Ullrich): the teacher's distribution over the
student's next token, exact in the subset regime (``docs/design.md``, regimes).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from ctalign.losses._common import (_rows_device, _NEG_INF, _ops, _check_reduction, _check_temperature,
                                    _check_logits, _check_ids, _fit, _token_mask, _check_alignment_ids,
                                    _alignment_lengths, _shifted_ce, _Terms, _teacher_rows, _is_topk,
                                    _select_rows)


TARGETS = ("exact", "boundary")


class LikelihoodTargets(NamedTuple):
    logprobs: torch.Tensor    # [B, Ls, Vs + 1]: target for student token j (column Vs = end), -inf rows if none
    valid: torch.Tensor       # [B, Ls] bool: a target exists
    end_logprob: torch.Tensor  # [B, Ls]: log q(end | pieces through token j) where j ends a teacher token, else 0
    # [B, Ls] bool: the target is the exact next-student-token distribution over the covers it
    # accounts for (see likelihood_targets); False where the documented approximation serves
    exact: torch.Tensor | None = None
    # [B, Ls] (with_end=True): log-probability of token j along the teacher's own tokenization (the
    # boundary form's value at s_j), so that sum(path_logprob + end_logprob) = log p_teacher(text)
    path_logprob: torch.Tensor | None = None


def _check_targets(targets) -> str:
    if targets is None:
        return "exact"
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS} (or precomputed LikelihoodTargets), got {targets!r}")
    return targets


def likelihood_targets(teacher_logits, amap, alignment, *, temperature: float = 1.0,
                       with_end: bool = False, student_width: int | None = None,
                       targets: str = "exact") -> LikelihoodTargets:
    """The teacher's distribution over the student vocabulary (+ ``end``) for every student token.

    Student token ``j`` (predicted by student row ``j - 1``) lies in teacher token ``t_k`` (predicted
    by teacher row ``k - 1 = alignment.s_teacher_row[j]``) after the student pieces ``c`` already
    consumed there (``alignment.s_consumed``). ``P_k = project_to_student(row k - 1)``,
    ``W_k(c) = project_to_student_within(row k - 1, c)`` (``docs/design.md``).

    ``targets="exact"`` (default): the exact next-student-token distribution over the covers that
    keep the teacher's own tokenization up to ``t_{k-1}``, from the rows the forward pass computed:

    * at a teacher boundary (``c`` empty), ``t_{k-1}`` either goes on or ends:
      ``q(s) = W[s] + W[end] * P_k[s]`` with ``W = W_{k-1}(dec_S(t_{k-1}))`` (row ``k - 2``), and
      ``q(end) = W[end] * P_k[end]``; after a teacher special ``q = P_k`` (a special never goes on);
    * inside ``t_k``: ``W_k(c)`` without its ``end`` column, renormalised: the covers in which a
      shorter teacher token ends here need the teacher row after it, which no forward pass computed,
      and are left out (so is the rest of the skipped covers: a token spanning several earlier
      teacher tokens). :func:`ctalign.scoring.lossless_logprobs` makes those evaluations.

    ``targets="boundary"``: the targets conditioned on the teacher's own boundaries (the papers' fast
    form): ``P_k`` at a boundary, ``W_k(c)`` (with its ``end`` column) inside. Each row is the exact
    distribution given that ``t_{k-1}`` ends where the teacher's tokenization ends it.

    Matched specials use the boundary projection (eos to eos, ...). In the identical regime the
    target is the teacher's own distribution (both kinds). ``exact`` says where a target is exact in
    the sense above: every predicted position in the subset regime except a first teacher token
    without a row before it. General regime: the construction is used where the student's tokens of
    ``t_k`` so far (and, at a boundary, those of ``t_{k-1}``) are the ``dec_S`` pieces of that token,
    with none crossing a teacher boundary (``exact`` True); elsewhere the documented approximation:
    ``dec_S`` stands for how the student splits each teacher token; a boundary whose previous teacher
    token the student split otherwise gets ``P_k``; student tokens that cross a teacher boundary are
    scored by the teacher tokens whose ``dec_S`` starts with them (the continuation into the next
    teacher token is dropped), and positions whose consumed pieces are not a ``dec_S`` prefix get no
    target (``valid`` False). :func:`exact_share` / ``Alignment.report(amap)`` count them.

    ``with_end=True``: ``end_logprob`` (log ``W(end)`` after the last piece of every teacher token)
    and ``path_logprob`` (the boundary form's value at ``s_j``), so that in the subset regime
    ``sum_j path_logprob[j] + sum end_logprob = log p_teacher(text)`` (with ``targets="boundary"``,
    ``path_logprob[j] = logprobs[j, s_j]``). Float64 teacher logits give float64 targets.
    """
    temperature = _check_temperature(temperature)
    kind = _check_targets(targets)
    plan = _TargetPlan(teacher_logits, amap, alignment, student_width, kind)
    B, Ls, Vs, dev = plan.B, plan.Ls, amap.n_student, plan.device
    out = torch.full((B, Ls, Vs + 1), _NEG_INF, dtype=plan.dtype, device=dev)
    end_lp = torch.zeros((B, Ls), dtype=plan.dtype, device=dev)
    has = plan.has_target
    qb, qj = torch.nonzero(has, as_tuple=True)
    if qb.numel():
        out[qb, qj] = plan.rows(qb, qj, temperature)
    path = None
    if with_end:
        path = torch.zeros((B, Ls), dtype=plan.dtype, device=dev)
        sid = _fit(alignment.student_ids.to(dev), Ls, 0).clamp(0, Vs) if alignment.student_ids is not None else None
        if sid is not None and qb.numel():
            if kind == "boundary" or plan.regime == "identical":
                path[qb, qj] = out[qb, qj, sid[qb, qj]]
            else:
                fast = plan.rows(qb, qj, temperature, kind="boundary")
                path[qb, qj] = fast.gather(1, sid[qb, qj][:, None])[:, 0]
    if with_end and plan.regime != "identical":
        ends = plan.ends_teacher & (plan.row >= 0) & (plan.after >= 0)
        if ends.any():
            with torch.no_grad():
                w = _ops().project_to_student_within(plan.teacher_rows, amap, plan.flat_row[ends],
                                                     plan.after[ends].int(), temperature=temperature)
            end_lp[ends] = w.to(plan.dtype)[:, Vs]
    valid = has & torch.isfinite(out[..., :Vs]).any(-1)
    return LikelihoodTargets(out, valid, end_lp, plan.exact & valid, path)


def exact_share(amap, alignment, *, student_mask=None) -> dict:
    """How many student positions get an exact likelihood target (:func:`likelihood_targets`,
    ``targets="exact"``), from the alignment alone (no teacher logits): a dict with ``predicted``
    (positions a teacher row predicts, past position 0, within ``student_mask`` if given),
    ``with_target``, ``exact``, ``share`` (exact / predicted), and the approximated positions by cause:
    ``crossing`` (the student token crosses a teacher boundary), ``not_dec_prefix`` (its pieces are
    no ``dec_S`` prefix of its teacher token), ``previous_split`` (a boundary whose previous teacher
    token the student split otherwise, or that has no teacher row)."""
    plan = _TargetPlan(None, amap, alignment, None, "exact")
    pred = plan.row >= 0
    pred[:, :1] = False
    if student_mask is not None:
        pred = pred & _fit(torch.as_tensor(student_mask).bool().to(plan.device), plan.Ls, False)
    n = int(pred.sum())
    ex = int((plan.exact & pred).sum())
    rest = pred & ~plan.exact
    crossing = rest & plan.crossing
    not_dec = rest & ~crossing & ~plan.token_ok
    return {"predicted": n, "with_target": int((plan.has_target & pred).sum()), "exact": ex,
            "share": ex / n if n else 1.0, "crossing": int(crossing.sum()), "not_dec_prefix": int(not_dec.sum()),
            "previous_split": int((rest & ~crossing & ~not_dec).sum())}


class _TargetPlan:
    """Which teacher rows and queries serve each student token (see :func:`likelihood_targets`), and
    the target rows for any subset of the tokens (so the loss can build them a chunk at a time).
    ``teacher_logits`` None: the alignment-only parts (``exact``, for :func:`exact_share`)."""

    def __init__(self, teacher_logits, amap, alignment, student_width=None, kind: str = "exact"):
        self.amap, self.kind = amap, kind
        self.regime = getattr(amap, "regime", None)
        if teacher_logits is not None:
            self.teacher_rows, self.B, self.Lt = _teacher_rows(teacher_logits)
            if not _is_topk(teacher_logits):
                _check_logits(teacher_logits, "teacher logits", amap.n_teacher)
            dev = self.device = _rows_device(self.teacher_rows)
            lp = self.teacher_rows.logprobs if _is_topk(self.teacher_rows) else self.teacher_rows
            self.dtype = torch.float64 if lp.dtype == torch.float64 else torch.float32
        else:
            self.teacher_rows, self.B, self.Lt = None, alignment.s_teacher_row.shape[0], alignment.t_start.shape[1]
            dev = self.device = alignment.s_teacher_row.device
            self.dtype = torch.float32
        Ls = self.Ls = alignment.s_teacher_row.shape[1] if student_width is None else int(student_width)
        row = self.row = _fit(alignment.s_teacher_row.to(dev), Ls, -1)
        if row.shape[0] != self.B:
            raise ValueError(f"alignment has {row.shape[0]} rows, teacher logits {self.B}")
        if bool((row >= self.Lt).any()):
            raise ValueError(f"alignment refers to teacher position {int(row.max())}, teacher logits have {self.Lt}")
        self.at_boundary = _fit(alignment.s_at_boundary.to(dev), Ls, False)
        self.consumed = _fit(alignment.s_consumed.to(dev), Ls, -1)
        self.after = _fit(alignment.s_consumed_after.to(dev), Ls, -1)
        self.ends_teacher = _fit(alignment.s_ends_teacher.to(dev), Ls, False)
        self.flat_row = torch.arange(self.B, device=dev)[:, None] * self.Lt + row
        if self.regime == "identical":
            self.has_target = row >= 0
            self.exact = self.has_target.clone()
            self.compose = torch.zeros_like(self.has_target)
            self.crossing = self.token_ok = self.compose
            return
        self.has_target = (row >= 0) & (self.at_boundary | (self.consumed >= 0))
        self._plan_exact(amap, alignment, dev)

    def _plan_exact(self, amap, alignment, dev):
        """exact, compose (boundaries whose target composes the previous teacher token's row),
        prev_flat_row / prev_node (that row and the dec node of the previous token's pieces)."""
        Ls, B = self.Ls, self.B
        tt = _fit(alignment.s_teacher_token.to(dev), Ls, -1)
        t_role = alignment.t_role.to(dev)
        t_ids = alignment.teacher_ids.to(dev) if alignment.teacher_ids is not None else None
        s_role = _fit(alignment.s_role.to(dev), Ls, 0)
        Lt_al = t_role.shape[1]
        dec = _dec_tables(amap, dev)
        bidx = torch.arange(B, device=dev)[:, None].expand(B, Ls)
        kk = tt.clamp(0, max(Lt_al - 1, 0))
        # the student token ends inside its teacher token (no crossing)
        s_end = _fit(alignment.s_end.to(dev), Ls, 0)
        t_end = alignment.t_end.to(dev)
        self.crossing = (tt >= 0) & (s_role == 0) & (s_end > t_end[bidx, kk]) if Lt_al else torch.zeros_like(
            self.has_target)
        # the student's pieces of t_k through token j are a dec_S prefix of t_k
        if t_ids is not None and Lt_al:
            tid = t_ids[bidx, kk].long()
            self.token_ok = (s_role != 0) | ((self.after >= 0) & _is_ancestor(dec, self.after, dec["member_node"][tid]))
        else:
            self.token_ok = (s_role != 0) | (self.after >= 0)
        # the previous teacher token t_{k-1}, and the student token before j
        kp = (tt - 1).clamp(min=0)
        has_prev = (tt >= 1) & self.at_boundary & self.has_target
        prev_special = has_prev & (t_role[bidx, kp.clamp(max=max(Lt_al - 1, 0))] != 0) if Lt_al else has_prev
        sh = lambda x, fill: torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], 1) if Ls else x  # noqa: E731
        p_tt, p_row, p_after, p_ends = sh(tt, -1), sh(self.row, -1), sh(self.after, -1), sh(self.ends_teacher, False)
        compose = has_prev & ~prev_special & (p_tt == tt - 1) & p_ends & (p_row >= 0) & (p_after >= 0)
        if t_ids is not None and Lt_al:
            pid = t_ids[bidx, kp.clamp(max=Lt_al - 1)].long()
            compose = compose & (p_after == dec["member_node"][pid])
        self.compose = compose
        self.prev_flat_row = torch.arange(B, device=dev)[:, None] * self.Lt + p_row
        self.prev_node = p_after
        inside_ok = ~self.at_boundary & (self.consumed >= 0)
        boundary_ok = self.at_boundary & (prev_special | compose)
        self.exact = self.has_target & ~self.crossing & self.token_ok & (inside_ok | boundary_ok)

    @torch.no_grad()
    def rows(self, qb, qj, temperature, kind: str | None = None) -> torch.Tensor:
        """[Q, V_s + 1] target log-probs of the student tokens (qb, qj), which have a target."""
        kind = self.kind if kind is None else kind
        amap, ops = self.amap, _ops()
        Vs, Vt, dev = amap.n_student, amap.n_teacher, self.device
        flat_row = self.flat_row[qb, qj]
        out = torch.full((flat_row.numel(), Vs + 1), _NEG_INF, dtype=self.dtype, device=dev)
        if flat_row.numel() == 0:
            return out
        if self.regime == "identical":
            rows = _select_rows(self.teacher_rows, flat_row)
            if _is_topk(rows):
                lp = torch.full((flat_row.numel(), Vt), _NEG_INF, dtype=self.dtype, device=dev)
                lp.scatter_(1, rows.indices.long(), rows.logprobs.to(self.dtype))
                lp = torch.log_softmax(lp / temperature, -1)
            else:
                lp = rows[:, :Vt].to(self.dtype)
                lp = torch.log_softmax(lp if temperature == 1.0 else lp / temperature, -1)
            # identical regime = equal fingerprints: the same id -> bytes table, specials included, so
            # the student's distribution is the teacher's, id for id (the end column stays empty).
            out[:, :Vs] = lp[:, :Vs]
            return out
        at_boundary = self.at_boundary[qb, qj]
        inside = ~at_boundary
        if at_boundary.any():
            uniq, inv = torch.unique(flat_row[at_boundary], return_inverse=True)
            proj = ops.project_to_student(_select_rows(self.teacher_rows, uniq), amap, temperature=temperature)
            proj = proj.to(self.dtype)
            comp = self.compose[qb, qj][at_boundary] if kind == "exact" else None
            if comp is None or not bool(comp.any()):
                out[at_boundary] = proj[inv]
            else:
                # compose_rows, sparse in w: q = w[end] + P everywhere, then w's few finite columns
                # (the students pieces that continue t_{k-1}) added in log space
                bq, bj = qb[at_boundary][comp], qj[at_boundary][comp]
                w = ops.project_to_student_within(self.teacher_rows, amap, self.prev_flat_row[bq, bj],
                                                  self.prev_node[bq, bj].int(), temperature=temperature).to(self.dtype)
                shift = torch.zeros(len(inv), 1, dtype=self.dtype, device=dev)
                at_c = torch.nonzero(comp, as_tuple=True)[0]
                shift[at_c] = w[:, -1:]
                rows_b = proj[inv] + shift
                r, c = torch.nonzero(torch.isfinite(w[:, :-1]), as_tuple=True)
                rows_b[at_c[r], c] = torch.logaddexp(w[r, c], rows_b[at_c[r], c])
                out[at_boundary] = rows_b
        if inside.any():
            w = ops.project_to_student_within(self.teacher_rows, amap, flat_row[inside],
                                              self.consumed[qb, qj][inside].int(), temperature=temperature)
            w = w.to(self.dtype)
            if kind == "exact":
                w = _drop_end(w)
            out[inside] = w
        return out


def compose_rows(w: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """The next-unit distribution after a teacher token that either goes on (``w``, its within-token
    conditional, ``end`` last) or ends and is followed by the next teacher step (``nxt``, the next
    row's boundary distribution, ``end`` last): ``q[u] = w[u] + w[end] * nxt[u]`` for every unit,
    ``q[end] = w[end] * nxt[end]``; log space, rows ``[Q, U + 1]``."""
    we = w[:, -1:]
    q = torch.logaddexp(w, we + nxt)
    q[:, -1] = (we + nxt[:, -1:])[:, 0]
    return q


def _drop_end(lp: torch.Tensor) -> torch.Tensor:
    """Rows without their last column, renormalised (all -inf where nothing is left)."""
    lp = lp.clone()
    lp[:, -1] = _NEG_INF
    z = torch.logsumexp(lp, -1, keepdim=True)
    return torch.where(torch.isfinite(z), lp - z, torch.full_like(lp, _NEG_INF))


def _dec_tables(amap, device) -> dict:
    """member_node, node_parent, node_depth of the map's dec trie as int64 tensors (cached per device)."""
    cache = amap.__dict__.setdefault("_likelihood_dec_tables", {}) if hasattr(amap, "__dict__") else {}
    key = str(device)
    if key not in cache:
        arrays = amap.trie_arrays("dec_trie")
        cache[key] = {f: torch.from_numpy(np.array(arrays[f], dtype=np.int64)).to(device)
                      for f in ("member_node", "node_parent", "node_depth")}
    return cache[key]


def _is_ancestor(dec: dict, node: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
    """Whether dec-trie ``node`` (>= 0) is ``of`` or one of its ancestors (``of`` -1: False)."""
    depth, parent = dec["node_depth"], dec["node_parent"]
    ok = (node >= 0) & (of >= 0)
    n, a = node.clamp(min=0), of.clamp(min=0)
    want = depth[n]
    for _ in range(int(depth.max()) if depth.numel() else 0):
        up = depth[a] > want
        if not bool(up.any()):
            break
        a = torch.where(up, parent[a].clamp(min=0), a)
    return ok & (a == n)


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
                                 targets: "str | LikelihoodTargets | None" = "exact",
                                 chunk_size: int = 512) -> torch.Tensor:
    """Cross-tokenizer likelihood scoring: ``kl_weight x KL(teacher -> student vocab || student) +
    ce_weight x CE`` (defaults 0.8 and 0.2).

    The teacher targets are :func:`likelihood_targets` of kind ``targets``: ``"exact"`` (default; the
    exact next-student-token distributions, composed at teacher boundaries from the previous and the
    current teacher row) or ``"boundary"`` (conditioned on the teacher's own boundaries, the papers'
    fast form); or precomputed :class:`LikelihoodTargets`. The KL drops the target's ``end`` column
    and renormalises the rest (what this drops: the mass of teacher specials that have no student
    counterpart; with ``"boundary"`` inside a teacher token also the mass of the teacher tokens that
    end exactly there and would be followed by another teacher token). ``top_k``: KL over the
    target's top k student tokens plus one bin for the rest of the mass (exact when k covers the
    vocabulary); ``None``: dense KL. Student positions without a target count in the CE only.
    Targets are built ``chunk_size`` positions at a time (memory ``O(chunk_size x V_s)`` beyond the
    logits), or taken from ``targets`` (:func:`likelihood_targets`, e.g. precomputed).
    """
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    precomputed = isinstance(targets, LikelihoodTargets)
    kind = None if precomputed else _check_targets(targets)
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
            t = t[:, :Vs].float()
            good = torch.isfinite(t).any(-1)
            qb, qj, t = qb[good], qj[good], t[good]
            t = t - torch.logsumexp(t, -1, keepdim=True)
            x = student_logits[qb, qj - 1, :Vs].float()
            s = torch.log_softmax(x if temperature == 1.0 else x / temperature, -1)
            return qb, qj, _kl_rows(t, s, top_k)

        parts = []
        if precomputed:
            tl, tvalid = targets.logprobs.to(dev), targets.valid.to(dev)
            if tuple(tl.shape[:2]) != (B, Ls):
                raise ValueError(f"targets are for shape {tuple(tl.shape[:2])}, student logits {(B, Ls)}")
            pos = tvalid & target
            pos[:, 0] = False
            qb, qj = torch.nonzero(pos, as_tuple=True)
            parts.append(kl_of(qb, qj, tl[qb, qj]))
        else:
            plan = _TargetPlan(teacher_logits, amap, alignment, Ls, kind)
            pos = plan.has_target.to(dev) & target
            pos[:, 0] = False
            qb, qj = torch.nonzero(pos, as_tuple=True)
            for lo in range(0, qb.numel(), chunk_size):
                b_, j_ = qb[lo:lo + chunk_size], qj[lo:lo + chunk_size]
                t = plan.rows(b_.to(plan.device), j_.to(plan.device), temperature)
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
                 temperature: float = 1.0, reduction: str = "mean", targets: str = "exact"):
        super().__init__()
        _check_reduction(reduction)
        self.targets = _check_targets(targets)
        self.amap = amap
        self.kl_weight, self.ce_weight, self.top_k = kl_weight, ce_weight, top_k
        self.temperature = _check_temperature(temperature)
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, student_ids, alignment, student_mask=None):
        return likelihood_distillation_loss(student_logits, teacher_logits, student_ids, alignment, self.amap,
                                            student_mask=student_mask, kl_weight=self.kl_weight,
                                            ce_weight=self.ce_weight, top_k=self.top_k,
                                            temperature=self.temperature, reduction=self.reduction,
                                            targets=self.targets)

    def extra_repr(self) -> str:
        return (f"regime={getattr(self.amap, 'regime', None)!r}, targets={self.targets!r}, kl_weight={self.kl_weight}, "
                f"ce_weight={self.ce_weight}, top_k={self.top_k}, temperature={self.temperature}")
