"""ESCD, event-set completion distillation (arXiv 2609.34738): BPM's root term plus a child term at
the state the student reaches after emitting a strict byte prefix of a teacher token.

Definitions (BPM's rows, target and labels: :mod:`ctalign.losses.bpm`; tables:
:mod:`ctalign.prefix_groups`):

* **Events.** A teacher token ``t`` whose longest student prefix ``g = g(t)`` is shorter than it
  leaves a residual ``r(t) = bytes(t)[len(bytes(g)):]``. Its completion set ``C(r)`` is the student
  tokens whose bytes start with ``r``: one range of the student's byte trie (``child_lo/hi``), so
  ``sum_{u in C(r)} p_student(u | x')`` is one range query on the student's logits (the compiled
  range kernel, with its backward).
* **Child term** at a root position ``j`` (student row ``j - 1`` has a BPM target, teacher row
  ``k - 1``): ``sum_t -M_t log sum_{u in C(r(t))} p_student(u | x')`` over the teacher tokens ``t``
  with ``g(t) = g`` and a residual, where ``M_t = p(t)`` is the teacher's (absolute, unnormalised)
  mass of that event in row ``k - 1`` at temperature ``T``, and ``x' = x . g`` is the state after the
  student emits ``g``. ``M_g`` of the paper is the mass of the event ``(g, r)``; teacher ids that
  share bytes are separate terms with the same residual, which sums their masses.
* **Which states (off-policy).** The batch holds the student's logits along its own tokens only, so
  the child term is computed where ``x . g`` is a state of the batch: the realised student token
  ``s_j`` starts at the teacher boundary, ends strictly inside ``t_k`` (no crossing, not its end), and
  ``g = s_j`` (up to ids with the same bytes); ``x'`` is then student row ``j``. The child terms of
  the other groups ``g != s_j`` would need the student's logits at ``x . g``: one extra student
  forward per (position, group), i.e. up to ``G`` more sequences per position for the ``G`` groups
  with a residual in the teacher row, which this loss does not run. :func:`escd_child_term` reports
  both masses (``covered_mass``: the events scored; ``omitted_mass``: those that need the extra
  forward) so the share can be logged.
* **Left out.** A residual that no student token starts with (``C(r)`` empty: the student cannot
  complete it in one step; ``PrefixGroups.summary()['strict_without_completion']``) has no child
  term (its ``-log 0`` is infinite); a completion mass that underflows is floored at ``e^-87``.
* **Row masks.** ``mask_whitespace=True`` by default, as for BPM: ESCD contains BPM's root term, and
  the whitespace-collapse rows are exactly those whose realised token is spaces/tabs; a withheld row
  loses its root and its child term. ``row_mask``: a user mask, same convention.

Loss: ``root_weight x KL_root + child_weight x child + ce_weight x CE`` (defaults 1, 1, 0). With
``reduction='mean'`` both distillation terms are averaged over the root positions (the per-position
ESCD objective, the child term 0 where none applies); ``'none'`` puts root and child at position
``j``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from ctalign.losses._common import _Terms, _shifted_ce, _is_topk, _select_rows
from ctalign.losses.bpm import (_BPMPlan, _bpm_root, _check_residual, _prepare, _tables, _LOG_FLOOR, _acc_dtype)
from ctalign.losses.row_masks import _kept_rows
from ctalign.losses._common import _check_reduction, _check_temperature


class ESCDChild(NamedTuple):
    values: torch.Tensor        # [B, Ls] float32: the child term of root position j (0 where none)
    rows: torch.Tensor          # [B, Ls] bool: a child term was computed at j (student row j is x')
    covered_mass: torch.Tensor  # [B, Ls]: teacher mass of the residual events scored at j
    omitted_mass: torch.Tensor  # [B, Ls]: teacher mass of completable residual events of other groups


def _group_members(amap, device):
    """CSR (ptr int64[V_s + 2], teacher ids) of the completable strict teacher tokens by group, on device."""
    store = amap.__dict__.setdefault("_ctalign_prefix_groups", {})
    key = ("escd_members", str(device))
    if key not in store:
        pg = _tables(amap)[0]
        ok = pg.strict & (pg.child_hi > pg.child_lo)
        ids = np.nonzero(ok)[0]
        g = pg.group[ids].astype(np.int64)
        perm = np.argsort(g, kind="stable")
        ptr = np.zeros(pg.n_student + 2, dtype=np.int64)
        np.add.at(ptr, g + 1, 1)
        ptr = np.cumsum(ptr)
        host = {"ptr": torch.from_numpy(ptr), "ids": torch.from_numpy(ids[perm].astype(np.int64)),
                "ok": torch.from_numpy(ok), "group": torch.from_numpy(pg.group.astype(np.int64)),
                "lo": torch.from_numpy(pg.child_lo.astype(np.int64)), "hi": torch.from_numpy(pg.child_hi.astype(np.int64)),
                "rep": torch.from_numpy(pg.rep.astype(np.int64))}
        store[key] = {k: v.to(device) for k, v in host.items()}
    return store[key]


def _child_positions(plan: _BPMPlan, pos: torch.Tensor) -> torch.Tensor:
    """Root positions whose realised student token is a strict prefix inside its teacher token."""
    return pos & ~plan.crossing & ~plan.ends_teacher & (plan.s_role == 0)


def _child(student_logits, ids, plan: _BPMPlan, amap, pos, temperature, chunk_size: int = 256) -> ESCDChild:
    B, Ls, _ = student_logits.shape
    dev = student_logits.device
    Vt, Vs = amap.n_teacher, amap.n_student
    values = student_logits.new_zeros((B, Ls), dtype=_acc_dtype(student_logits))
    covered = torch.zeros(B, Ls, dtype=torch.float32, device=dev)
    omitted = torch.zeros(B, Ls, dtype=torch.float32, device=dev)
    rows = torch.zeros(B, Ls, dtype=torch.bool, device=dev)
    cpos = _child_positions(plan, pos.to(plan.device))
    qb, qj = torch.nonzero(cpos, as_tuple=True)
    if qb.numel() == 0:
        return ESCDChild(values + student_logits.sum() * 0.0, rows, covered, omitted)
    tdev = plan.device
    tab = _group_members(amap, tdev)
    s_trie = _tables(amap)[3]
    for lo_ in range(0, qb.numel(), chunk_size):
        values = _child_chunk(student_logits, ids, plan, amap, qb[lo_:lo_ + chunk_size], qj[lo_:lo_ + chunk_size],
                              temperature, tab, s_trie, values, rows, covered, omitted)
    return ESCDChild(values + student_logits.sum() * 0.0, rows, covered, omitted)


def _child_chunk(student_logits, ids, plan, amap, qb, qj, temperature, tab, s_trie, values, rows, covered, omitted):
    """Adds the child terms of the root positions (qb, qj) (on the teacher rows' device) into values."""
    from ctalign import ops
    from ctalign.ops.reference import tempered_logprobs
    B, Ls, _ = student_logits.shape
    dev = student_logits.device
    Vt, Vs = amap.n_teacher, amap.n_student
    tdev = plan.device
    g = tab["rep"][ids.to(tdev)[qb, qj].clamp(0, Vs - 1)]
    flat = plan.flat_row[qb, qj]
    with torch.no_grad():
        sel = _select_rows(plan.teacher_rows, flat)
        if _is_topk(sel):
            idx = sel.indices.long()
            lp = tempered_logprobs(sel.logprobs.double(), temperature)  # the ops' TopK convention
            p = lp.exp()
            ok = tab["ok"][idx]
            mine = ok & (tab["group"][idx] == g[:, None])
            covered_q = torch.where(mine, p, torch.zeros_like(p)).sum(-1)
            omitted_q = torch.where(ok & ~mine, p, torch.zeros_like(p)).sum(-1)
            ei, ek = torch.nonzero(mine, as_tuple=True)
            ent_t, ent_lp = idx[ei, ek], lp[ei, ek]
        else:
            x = sel[:, :Vt].double() / temperature
            lse = torch.logsumexp(x, -1)
            p_ok = torch.where(tab["ok"][None, :], (x - lse[:, None]).exp(), torch.zeros_like(x)).sum(-1)
            start, stop = tab["ptr"][g], tab["ptr"][g + 1]
            count = stop - start
            ei = torch.repeat_interleave(torch.arange(len(g), device=tdev), count)
            first = torch.cumsum(count, 0) - count
            ent_t = tab["ids"][start[ei] + torch.arange(len(ei), device=tdev) - first[ei]]
            ent_lp = x[ei, ent_t] - lse[ei]
            covered_q = torch.zeros(len(g), dtype=torch.float64, device=tdev).index_add(0, ei, ent_lp.exp())
            omitted_q = (p_ok - covered_q).clamp_min(0.0)
    has = torch.zeros(len(g), dtype=torch.bool, device=tdev)
    has[ei] = True
    qb_d, qj_d = qb.to(dev), qj.to(dev)
    covered[qb_d, qj_d] = covered_q.float().to(dev)
    omitted[qb_d, qj_d] = omitted_q.float().to(dev)
    if ei.numel():
        s_rows = (qb * Ls + qj)[ei].to(dev)
        lo = tab["lo"][ent_t].to(dev, torch.int32)[:, None]
        hi = tab["hi"][ent_t].to(dev, torch.int32)[:, None]
        logc = ops._ranges("escd_child", student_logits, Vs, "the map's student vocabulary", s_trie, s_rows, lo, hi,
                           temperature)[:, 0]
        m = ent_lp.exp().to(dev, values.dtype)
        terms = -m * logc.to(values.dtype).clamp_min(_LOG_FLOOR)
        per_q = torch.zeros(len(g), dtype=terms.dtype, device=dev).index_add(0, ei.to(dev), terms)
        hq = has.to(dev)
        values = values.index_put((qb_d[hq], qj_d[hq]), per_q[hq], accumulate=True)
        rows[qb_d[hq], qj_d[hq]] = True
    return values


def escd_child_term(student_logits, teacher_logits, student_ids, alignment, amap, *, student_mask=None,
                    row_mask=None, mask_whitespace: bool = True, temperature: float = 1.0) -> ESCDChild:
    """ESCD's child term per root position (module docstring), differentiable in the student
    logits; with the teacher masses scored (``covered_mass``) and left for an extra forward
    (``omitted_mass``)."""
    temperature, Vs, B, Ls, dev, ids, target = _prepare(student_logits, student_ids, alignment, amap,
                                                        student_mask, "mean", temperature)
    plan = _BPMPlan(teacher_logits, amap, alignment, Ls)
    kept = _kept_rows(ids, amap, (B, Ls), dev, row_mask, mask_whitespace)
    pos = plan.has_target.to(dev) & target & kept
    pos[:, 0] = False
    return _child(student_logits, ids, plan, amap, pos, temperature)


def escd_loss(student_logits: torch.Tensor, teacher_logits, student_ids, alignment, amap, *, student_mask=None,
              row_mask=None, mask_whitespace: bool = True, root_weight: float = 1.0, child_weight: float = 1.0,
              ce_weight: float = 0.0, temperature: float = 1.0, residual: str = "match", reduction: str = "mean",
              chunk_size: int = 512) -> torch.Tensor:
    """ESCD: ``root_weight x KL(BPM target || student) + child_weight x child + ce_weight x CE``
    (module docstring; arguments as :func:`ctalign.losses.bpm_loss`)."""
    _check_residual(residual)
    temperature, Vs, B, Ls, dev, ids, target = _prepare(student_logits, student_ids, alignment, amap,
                                                        student_mask, reduction, temperature)
    terms = _Terms(student_logits)
    terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, target), target.sum())
    if (root_weight != 0.0 or child_weight != 0.0) and Ls > 1:
        kept = _kept_rows(ids, amap, (B, Ls), dev, row_mask, mask_whitespace)
        kl, n, plan, used = _bpm_root(student_logits, teacher_logits, ids, alignment, amap, target, kept,
                                      temperature, residual, chunk_size)
        terms.add(root_weight, kl, n)
        if child_weight != 0.0:
            child = _child(student_logits, ids, plan, amap, used, temperature)
            terms.add(child_weight, child.values, n)
    return terms.reduce(reduction)


class ESCDLoss(nn.Module):
    """Module form of :func:`escd_loss` for one alignment map."""

    def __init__(self, amap, *, root_weight: float = 1.0, child_weight: float = 1.0, ce_weight: float = 0.0,
                 temperature: float = 1.0, residual: str = "match", mask_whitespace: bool = True,
                 reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.amap = amap
        self.residual = _check_residual(residual)
        self.root_weight, self.child_weight, self.ce_weight = root_weight, child_weight, ce_weight
        self.temperature = _check_temperature(temperature)
        self.mask_whitespace, self.reduction = bool(mask_whitespace), reduction

    def forward(self, student_logits, teacher_logits, student_ids, alignment, student_mask=None, row_mask=None):
        return escd_loss(student_logits, teacher_logits, student_ids, alignment, self.amap,
                         student_mask=student_mask, row_mask=row_mask, mask_whitespace=self.mask_whitespace,
                         root_weight=self.root_weight, child_weight=self.child_weight, ce_weight=self.ce_weight,
                         temperature=self.temperature, residual=self.residual, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"root_weight={self.root_weight}, child_weight={self.child_weight}, ce_weight={self.ce_weight}, "
                f"temperature={self.temperature}, residual={self.residual!r}, mask_whitespace={self.mask_whitespace}")
