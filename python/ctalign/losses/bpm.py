"""BPM, byte-prefix marginalisation (arXiv 2607.22334): the teacher's next-token distribution
marginalised onto the longest student token that prefixes each teacher token, plus a residual column.

Definitions (the grouping: :mod:`ctalign.prefix_groups`):

* **Rows.** A student token ``j`` that starts at a teacher boundary (``alignment.s_at_boundary``)
  and is predicted by a teacher row (``k - 1 = alignment.s_teacher_row[j]``) gets a target; student
  row ``j - 1`` is scored. Positions inside a teacher token get none (ESCD's child term is the part
  of the objective that reaches them, :mod:`ctalign.losses.escd`).
* **Target** over ``V_s + 1`` columns: ``q(s) = sum_{t : g(t) = s} p(t)`` where ``g(t)`` is the
  longest student token whose bytes are a prefix of ``bytes(t)`` (the smallest id among ids with the
  same bytes), and ``q(V_s)`` (the residual) holds the teacher tokens with no such student token and
  the teacher specials without a student special of their role. It is the existing grouped kernel
  (``project_to_student``'s) over another group array, so it is exact in float32 and takes dense or
  ``TopK`` teacher rows (TopK: the kept mass, not renormalised, as every op).
* **Labels.** ``exact[b, j]``: the row's realised student token lies within the teacher token that
  starts there (its bytes are a prefix of ``bytes(t_k)``, or it is a matched special): the teacher's
  probability of the student's event is then one teacher step, which this target holds.
  ``lower_bound``: the realised student token crosses into the next teacher token; its probability
  is a chain product over teacher rows of which a single-row target can only hold a lower bound.
* **Student side / residual.** The student's distribution is read on the same ``V_s + 1`` columns:
  column ``s`` holds the student's mass of every id with ``bytes(s)`` (ids sharing bytes share a
  column), and the student's residual is its mass on the student tokens that are no teacher token's
  group (``PrefixGroups.student_group == V_s``): the events the projection cannot name on either
  side. ``residual="drop"`` instead drops the residual column on both sides and renormalises both;
  this is also used, per map, when no student token is left for the residual (it cannot hold mass).
* **Divergence.** Forward ``KL(target || student)`` over the columns (``sum_c q_c (log q_c - log
  s_c)``), at temperature ``T`` on both sides, no ``T**2``. A student log-probability that underflows
  to ``-inf`` where the target has mass is floored at ``-87`` (float32's smallest normal), so the loss
  stays finite.
* **Row masks.** ``mask_whitespace=True`` (default, as BPM's code ships) withholds the target where
  the realised student token is only spaces/tabs; ``row_mask`` is a user mask (``row_masks``).

Loss: ``kl_weight x KL + ce_weight x CE`` (defaults 1 and 0) with the conventions of
``ctalign.losses`` (token masks, reductions incl. ``global_mean``, never NaN).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ctalign.losses._common import (_NEG_INF, _check_reduction, _check_temperature, _check_logits, _check_ids,
                                    _fit, _token_mask, _check_alignment_ids, _alignment_lengths, _shifted_ce,
                                    _Terms, _teacher_rows, _is_topk, _select_rows, _rows_device)
from ctalign.losses.row_masks import _kept_rows

RESIDUAL = ("match", "drop")
_LOG_FLOOR = -87.0


class BPMTargets(NamedTuple):
    logprobs: torch.Tensor  # [B, Ls, V_s + 1]: target of student token j (column V_s = residual); -inf rows if none
    valid: torch.Tensor     # [B, Ls] bool: a target exists
    exact: torch.Tensor     # [B, Ls] bool: valid and exact (see the module docstring); valid & ~exact: lower bound


def _check_residual(residual: str) -> str:
    if residual not in RESIDUAL:
        raise ValueError(f"residual must be one of {RESIDUAL}, got {residual!r}")
    return residual


def _tables(amap):
    """(PrefixGroups, teacher group tables, student group tables, student byte-trie tables) of a map, cached."""
    from ctalign.ops._tables import _Tables, _byte_trie
    from ctalign.prefix_groups import prefix_groups, student_byte_trie
    store = amap.__dict__.setdefault("_ctalign_prefix_groups", {})
    tabs = store.get("torch")
    if tabs is None:
        pg = prefix_groups(amap)
        t = _Tables({"group": torch.from_numpy(pg.group.copy())}, n_teacher=pg.n_teacher, n_student=pg.n_student)
        s = _Tables({"group": torch.from_numpy(pg.student_group.copy())}, n_student=pg.n_student)
        tabs = store["torch"] = (pg, t, s, _byte_trie(student_byte_trie(amap)))
    return tabs


class _BPMPlan:
    """Which rows get a BPM target and which teacher row serves each (see the module docstring)."""

    def __init__(self, teacher_logits, amap, alignment, Ls: int):
        self.amap = amap
        self.teacher_rows, self.B, self.Lt = _teacher_rows(teacher_logits)
        if not _is_topk(teacher_logits):
            _check_logits(teacher_logits, "teacher logits", amap.n_teacher)
        dev = self.device = _rows_device(self.teacher_rows)
        lp = self.teacher_rows.logprobs if _is_topk(self.teacher_rows) else self.teacher_rows
        self.dtype = torch.float64 if lp.dtype == torch.float64 else torch.float32
        self.Ls = Ls
        row = self.row = _fit(alignment.s_teacher_row.to(dev), Ls, -1)
        if row.shape[0] != self.B:
            raise ValueError(f"alignment has {row.shape[0]} rows, teacher logits {self.B}")
        if bool((row >= self.Lt).any()):
            raise ValueError(f"alignment refers to teacher position {int(row.max())}, teacher logits have {self.Lt}")
        self.flat_row = torch.arange(self.B, device=dev)[:, None] * self.Lt + row
        at_boundary = _fit(alignment.s_at_boundary.to(dev), Ls, False)
        self.has_target = (row >= 0) & at_boundary
        tt = _fit(alignment.s_teacher_token.to(dev), Ls, -1)
        s_role = _fit(alignment.s_role.to(dev), Ls, 0)
        s_end = _fit(alignment.s_end.to(dev), Ls, 0)
        t_end = alignment.t_end.to(dev)
        if t_end.shape[1]:
            kk = tt.clamp(0, t_end.shape[1] - 1)
            te = t_end.gather(1, kk)
        else:
            te = torch.zeros_like(s_end)
        self.crossing = (tt >= 0) & (s_role == 0) & (s_end > te)
        self.ends_teacher = _fit(alignment.s_ends_teacher.to(dev), Ls, False)
        self.s_role = s_role
        self.exact = self.has_target & ~self.crossing

    @torch.no_grad()
    def rows(self, qb, qj, temperature) -> torch.Tensor:
        """[Q, V_s + 1] BPM targets of the student tokens (qb, qj) (which have a target)."""
        from ctalign import ops
        _, t_tab, _, _ = _tables(self.amap)
        flat = self.flat_row[qb, qj]
        Vs = self.amap.n_student
        if flat.numel() == 0:
            return torch.full((0, Vs + 1), _NEG_INF, dtype=self.dtype, device=self.device)
        uniq, inv = torch.unique(flat, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if not _is_topk(self.teacher_rows) and hi - lo <= 2 * len(uniq):
            rows, inv = self.teacher_rows[lo:hi], flat - lo  # a view: no copy of the teacher rows
        else:
            rows = _select_rows(self.teacher_rows, uniq)
        out = ops._grouped("bpm_targets", rows, self.amap.n_teacher, "the map's teacher vocabulary", t_tab, Vs + 1,
                           temperature)
        return out.to(self.dtype)[inv]


def bpm_targets(teacher_logits, amap, alignment, *, temperature: float = 1.0,
                student_width: int | None = None) -> BPMTargets:
    """The BPM target of every student token (``[B, Ls, V_s + 1]``, ``-inf`` rows where none) with
    ``valid`` and ``exact`` (module docstring). Memory ``B x Ls x (V_s + 1)``: the loss builds them a
    chunk at a time instead."""
    temperature = _check_temperature(temperature)
    Ls = alignment.s_teacher_row.shape[1] if student_width is None else int(student_width)
    plan = _BPMPlan(teacher_logits, amap, alignment, Ls)
    out = torch.full((plan.B, Ls, amap.n_student + 1), _NEG_INF, dtype=plan.dtype, device=plan.device)
    qb, qj = torch.nonzero(plan.has_target, as_tuple=True)
    if qb.numel():
        out[qb, qj] = plan.rows(qb, qj, temperature)
    valid = plan.has_target & torch.isfinite(out).any(-1)
    return BPMTargets(out, valid, plan.exact & valid)


def _student_columns(student_logits, qb, qj, amap, temperature) -> torch.Tensor:
    """[Q, V_s + 1] student log-probabilities on BPM's columns (rows j - 1), differentiable."""
    from ctalign import ops
    _, _, s_tab, _ = _tables(amap)
    x = student_logits[qb, qj - 1]
    return ops._grouped("bpm_student", x, amap.n_student, "the map's student vocabulary", s_tab,
                        amap.n_student + 1, temperature)


def _kl_columns(target_lp: torch.Tensor, student_lp: torch.Tensor, drop_residual: bool) -> tuple:
    """(KL(target || student) per row, rows kept): both in log space over the same columns."""
    acc = torch.float64 if student_lp.dtype == torch.float64 else torch.float32
    t, s = target_lp.to(acc), student_lp.to(acc)
    if drop_residual:
        t, s = t[:, :-1], s[:, :-1]
        zt = torch.logsumexp(t, -1, keepdim=True)
        zs = torch.logsumexp(s, -1, keepdim=True)
        keep = torch.isfinite(zt[:, 0]) & torch.isfinite(zs[:, 0])
        t = t - torch.where(torch.isfinite(zt), zt, torch.zeros_like(zt))
        s = s - torch.where(torch.isfinite(zs), zs, torch.zeros_like(zs))
    else:
        keep = torch.isfinite(t).any(-1)
    # p = 0 columns: t = -inf -> any finite value (p * t = 0); p > 0: s floored so the term stays finite
    p = t.exp()
    t_c, s_c = t.clamp_min(-1e4), s.clamp_min(_LOG_FLOOR)
    kl = torch.bmm(p[:, None, :], (t_c - s_c)[:, :, None])[:, 0, 0]
    return kl, keep


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits (gradcheck), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _residual_dropped(amap, residual: str) -> bool:
    pg = _tables(amap)[0]
    return residual == "drop" or not bool((pg.student_group == pg.n_student).any())


def _prepare(student_logits, student_ids, alignment, amap, student_mask, reduction, temperature):
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    Vs = _check_logits(student_logits, "student logits", amap.n_student)
    B, Ls, _ = student_logits.shape
    dev = student_logits.device
    ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(dev)
    _check_alignment_ids(alignment, ids, "student")
    target = _token_mask(student_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    return temperature, Vs, B, Ls, dev, ids, target


def _bpm_root(student_logits, teacher_logits, ids, alignment, amap, target, kept, temperature, residual,
              chunk_size, targets=None):
    """(kl [B, Ls], count, plan, positions used (bool [B, Ls])) of BPM's root term."""
    B, Ls, _ = student_logits.shape
    dev = student_logits.device
    kl = student_logits.new_zeros((B, Ls), dtype=_acc_dtype(student_logits))
    used = torch.zeros(B, Ls, dtype=torch.bool, device=dev)
    drop = _residual_dropped(amap, residual)
    plan = None
    if isinstance(targets, BPMTargets):
        tl, tvalid = targets.logprobs.to(dev), targets.valid.to(dev)
        if tuple(tl.shape[:2]) != (B, Ls):
            raise ValueError(f"targets are for shape {tuple(tl.shape[:2])}, student logits {(B, Ls)}")
        pos = tvalid & target & kept
        pos[:, 0] = False
        chunks = [(qb, qj, tl[qb, qj]) for qb, qj in [torch.nonzero(pos, as_tuple=True)]]
    else:
        plan = _BPMPlan(teacher_logits, amap, alignment, Ls)
        pos = plan.has_target.to(dev) & target & kept
        pos[:, 0] = False
        qb_all, qj_all = torch.nonzero(pos, as_tuple=True)
        chunks = []
        for lo in range(0, qb_all.numel(), chunk_size):
            b_, j_ = qb_all[lo:lo + chunk_size], qj_all[lo:lo + chunk_size]
            chunks.append((b_, j_, plan.rows(b_.to(plan.device), j_.to(plan.device), temperature).to(dev)))
    n = 0
    for qb, qj, t in chunks:
        if qb.numel() == 0:
            continue
        s = _student_columns(student_logits, qb, qj, amap, temperature)
        v, keep = _kl_columns(t, s, drop)
        qb, qj, v = qb[keep], qj[keep], v[keep]
        if qb.numel():
            kl = kl.index_put((qb, qj), v, accumulate=True)
            used[qb, qj] = True
            n += qb.numel()
    return kl, n, plan, used


def bpm_loss(student_logits: torch.Tensor, teacher_logits, student_ids, alignment, amap, *, student_mask=None,
             row_mask=None, mask_whitespace: bool = True, kl_weight: float = 1.0, ce_weight: float = 0.0,
             temperature: float = 1.0, residual: str = "match", reduction: str = "mean",
             targets: BPMTargets | None = None, chunk_size: int = 512) -> torch.Tensor:
    """BPM: ``kl_weight x KL(BPM target || student) + ce_weight x CE`` (module docstring).

    ``student_logits`` ``[B, Ls, W]``, ``teacher_logits`` ``[B, Lt, W_t]`` or a ``TopK`` of
    ``[B, Lt, k]``, ``student_ids`` ``[B, Ls]``, ``alignment`` (``ctalign.align`` / the collator's),
    ``amap`` the map. ``student_mask``: token mask (CE and KL); ``row_mask`` and ``mask_whitespace``
    withhold the KL target only (``row_masks``). ``residual``: ``"match"`` (the student's mass on the
    tokens no teacher token maps to) or ``"drop"``. ``targets``: precomputed :func:`bpm_targets`.
    Targets are built ``chunk_size`` rows at a time (memory ``O(chunk_size x V_s)``)."""
    _check_residual(residual)
    temperature, Vs, B, Ls, dev, ids, target = _prepare(student_logits, student_ids, alignment, amap,
                                                        student_mask, reduction, temperature)
    terms = _Terms(student_logits)
    terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, target), target.sum())
    if kl_weight != 0.0 and Ls > 1:
        kept = _kept_rows(ids, amap, (B, Ls), dev, row_mask, mask_whitespace)
        kl, n, _, _ = _bpm_root(student_logits, teacher_logits, ids, alignment, amap, target, kept, temperature,
                                residual, chunk_size, targets)
        terms.add(kl_weight, kl, n)
    return terms.reduce(reduction)


class BPMLoss(nn.Module):
    """Module form of :func:`bpm_loss` for one alignment map."""

    def __init__(self, amap, *, kl_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
                 residual: str = "match", mask_whitespace: bool = True, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.amap = amap
        self.residual = _check_residual(residual)
        self.kl_weight, self.ce_weight = kl_weight, ce_weight
        self.temperature = _check_temperature(temperature)
        self.mask_whitespace, self.reduction = bool(mask_whitespace), reduction

    def forward(self, student_logits, teacher_logits, student_ids, alignment, student_mask=None, row_mask=None):
        return bpm_loss(student_logits, teacher_logits, student_ids, alignment, self.amap, student_mask=student_mask,
                        row_mask=row_mask, mask_whitespace=self.mask_whitespace, kl_weight=self.kl_weight,
                        ce_weight=self.ce_weight, temperature=self.temperature, residual=self.residual,
                        reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"kl_weight={self.kl_weight}, ce_weight={self.ce_weight}, temperature={self.temperature}, "
                f"residual={self.residual!r}, mask_whitespace={self.mask_whitespace}")
