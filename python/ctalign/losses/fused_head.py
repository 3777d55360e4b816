"""The machinery of the fused losses (:mod:`ctalign.losses.fused`): the output layer :class:`LMHead`,
the per-row terms, and the sweep that computes the student's logits a chunk of rows at a time and
folds each chunk's gradients into those of the hidden states, the weight and the bias during the
forward pass (:class:`_FusedHeadFunction`), plus the argument handling the losses share.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctalign.losses._common import (_check_reduction, _check_temperature, _check_ids, _token_mask,
                                    _check_alignment_ids, _alignment_lengths, _check_target_ids, _Terms,
                                    _global_counts)


# ---- the output layer -----------------------------------------------------------------------------
@dataclass
class LMHead:
    """A student's output layer: ``logits = softcap(scale x (hidden @ weight.T + bias))`` with
    ``softcap(x) = cap x tanh(x / cap)`` (Gemma's ``final_logit_softcapping``) when ``softcap`` is set.

    ``weight [V, H]`` (the padded width of a padded output layer is fine: columns past the
    vocabulary are ignored, as with logits), ``bias [V]`` or None, ``logit_scale`` a multiplier
    (Cohere's ``logit_scale``; Granite's ``logits_scaling`` divides: ``1 / logits_scaling``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float | None = None
    softcap: float | None = None

    def __post_init__(self):
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2:
            raise ValueError("LMHead.weight must be a [vocab, hidden] tensor")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ValueError(f"LMHead.bias must be [{self.weight.shape[0]}], got {tuple(self.bias.shape)}")
        if self.logit_scale is not None:
            self.logit_scale = float(self.logit_scale)
            if self.logit_scale == 1.0:
                self.logit_scale = None
        if self.softcap is not None:
            self.softcap = float(self.softcap)
            if not (self.softcap > 0 and math.isfinite(self.softcap)):
                raise ValueError(f"softcap must be a positive finite number, got {self.softcap}")

    @classmethod
    def of(cls, module) -> "LMHead":
        """The head of a transformers causal LM (``get_output_embeddings()``, tied or not, with the
        config's ``final_logit_softcapping`` / ``logit_scale`` / ``logits_scaling``), of an
        ``nn.Linear``, or an ``LMHead`` as is."""
        if isinstance(module, LMHead):
            return module
        if isinstance(module, torch.Tensor):
            return cls(module)
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias)
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        if out is None:
            raise TypeError(f"cannot find the output layer of {type(module).__name__} (pass an LMHead)")
        cfg = getattr(module, "config", None)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
        scale = getattr(cfg, "logit_scale", None)
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling not in (None, 1, 1.0):
            scale = (1.0 if scale is None else float(scale)) / float(scaling)
        return cls(out.weight, getattr(out, "bias", None), scale, getattr(cfg, "final_logit_softcapping", None))

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    def post(self, z: torch.Tensor) -> torch.Tensor:
        """The model's elementwise steps after the linear map."""
        if self.logit_scale is not None:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits (the unfused path; for tests and reference)."""
        return self.post(F.linear(hidden, self.weight, self.bias))


def default_chunk_size(width: int) -> int:
    """Rows per chunk: a power of two near 2**22 / V logits (about 16 MB of float32 per chunk-sized
    temporary), in [32, 1024]."""
    c = 2 ** int(round(math.log2(max(1.0, 2 ** 22 / max(int(width), 1)))))
    return int(min(1024, max(32, c)))


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- terms ----------------------------------------------------------------------------------------
class _Term:
    """One loss term: entries (student row read, position (b, j) credited), a row function of the
    entries' logits, its weight and position count. ``fn(x_chunk, local, e0, e1) -> values [e1 - e0]``
    (``x_chunk``: the logits of the chunk's rows, ``local``: each entry's row in it)."""

    def __init__(self, weight: float, rows: torch.Tensor, qb: torch.Tensor, qj: torch.Tensor, count,
                 fn: Callable, factor: torch.Tensor | None = None):
        order = torch.argsort(rows, stable=True)
        self.sorted = bool((order == torch.arange(len(order), device=order.device)).all()) if len(order) else True
        self.order = order
        self.weight, self.rows, self.qb, self.qj = float(weight), rows[order], qb[order], qj[order]
        self.count = torch.as_tensor(count)
        self.fn = fn
        self.factor = None if factor is None else factor[order]

    def entries(self, e0, e1):
        """Original entry indices of sorted entries [e0, e1) (what the row functions index)."""
        return slice(e0, e1) if self.sorted else self.order[e0:e1]


def _rows_of(x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    if local.numel() == x.shape[0] and bool((local == torch.arange(x.shape[0], device=local.device)).all()):
        return x
    return x.index_select(0, local)


class _Plan:
    """The terms of one loss call and what the sweep needs: the union of the rows read, each term's
    entry range per chunk and rows within the chunk, the reduction's coefficients."""

    def __init__(self, terms: list[_Term], B: int, Ls: int, reduction: str, chunk_size: int, device):
        self.terms = [t for t in terms if t.weight != 0.0]
        self.B, self.Ls, self.reduction, self.device = B, Ls, reduction, device
        rows = [t.rows for t in self.terms if t.rows.numel()]
        self.U = torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.long, device=device)
        self.chunk = int(chunk_size)
        n = self.U.numel()
        self.starts = list(range(0, n, self.chunk))
        bounds = torch.tensor([min(s, n) for s in self.starts] + [n], dtype=torch.long)
        for t in self.terms:
            u = torch.searchsorted(self.U, t.rows)  # each entry's index in U
            t.u = u
            t.bounds = torch.searchsorted(u.cpu(), bounds).tolist()
        self.coef = self._coefficients()

    def _coefficients(self) -> list[float]:
        red = self.reduction
        if red in ("sum", "none"):
            return [t.weight for t in self.terms]
        counts = [t.count.reshape(()) for t in self.terms]
        scale = 1.0
        if red == "global_mean" and counts:
            counts, scale = _global_counts(counts)
        return [t.weight / max(float(c), 1.0) * scale for t, c in zip(self.terms, counts)]


def _sweep(plan: _Plan, head: LMHead, hidden: torch.Tensor, weight, bias, *, grads: bool, want_h: bool = True,
           want_w: bool = True, want_b: bool = True, grad_none: torch.Tensor | None = None):
    """One pass over the chunks. Returns (per-term sums, per-position values or None, dh, dW, db).
    ``grads``: differentiate the reduction (scalar: the plan's coefficients; ``grad_none`` [B, Ls]:
    the incoming gradient of ``reduction='none'``)."""
    B, Ls = plan.B, plan.Ls
    H = hidden.shape[-1]
    h2 = hidden.reshape(B * Ls, H)
    sums = [torch.zeros((), dtype=torch.float64, device=hidden.device) for _ in plan.terms]
    none_out = None
    if plan.reduction == "none" and not grads:
        none_out = torch.zeros(B, Ls, dtype=_acc(hidden), device=hidden.device)
    dh = dW = db = None
    if grads:
        if want_h:
            dh = torch.zeros_like(h2)
        if want_w:
            dW = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else torch.float64,
                             device=weight.device)
        if want_b and bias is not None:
            db = torch.zeros(bias.shape, dtype=dW.dtype if dW is not None else torch.float32, device=bias.device)
    head_c = LMHead(weight, bias, head.logit_scale, head.softcap)
    for ci, c0 in enumerate(plan.starts):
        rows_c = plan.U[c0:c0 + plan.chunk]
        hc = h2.index_select(0, rows_c)
        with torch.no_grad():
            z = F.linear(hc, weight, bias)
        if grads:
            z.requires_grad_(True)
        ctx = torch.enable_grad() if grads else contextlib.nullcontext()
        contrib = None
        with ctx:
            x = head_c.post(z)
            for ti, t in enumerate(plan.terms):
                e0, e1 = t.bounds[ci], t.bounds[ci + 1]
                if e0 == e1:
                    continue
                local = t.u[e0:e1] - c0
                v = t.fn(x, local, t.entries(e0, e1))
                if t.factor is not None:
                    v = v * t.factor[e0:e1].to(v.dtype)
                sums[ti] = sums[ti] + v.detach().double().sum()
                if none_out is not None:
                    none_out.index_put_((t.qb[e0:e1], t.qj[e0:e1]), (t.weight * v.detach()).to(none_out.dtype),
                                       accumulate=True)
                if grads:
                    if grad_none is not None:
                        w = (t.weight * grad_none[t.qb[e0:e1], t.qj[e0:e1]]).to(v.dtype)
                        share = (w * v).sum()
                    else:
                        share = plan.coef[ti] * v.sum()
                    contrib = share if contrib is None else contrib + share
        if grads and contrib is not None and contrib.requires_grad:
            dz, = torch.autograd.grad(contrib, z)
            if dh is not None:
                dh.index_copy_(0, rows_c, _rows_matmul(dz, weight).to(dh.dtype))
            if dW is not None or db is not None:
                dzf = dz if dz.dtype == (dW.dtype if dW is not None else db.dtype) else dz.to(
                    dW.dtype if dW is not None else db.dtype)
                if dW is not None:
                    dW.addmm_(dzf.t(), hc if hc.dtype == dW.dtype else hc.to(dW.dtype))
                if db is not None:
                    db.add_(dzf.sum(0))
            del dz
        del z, x, contrib
    if dh is not None:
        dh = dh.view_as(hidden)
    return sums, none_out, dh, dW, db


def _rows_matmul(dz: torch.Tensor, weight: torch.Tensor, min_rows: int = 16) -> torch.Tensor:
    """``dz @ weight`` for a chunk's rows. A BLAS product of very few rows (a chunk's last ones) over
    the long vocabulary dimension takes a path that rounds ~30x more than the unfused product over
    all rows (measured: 8 rows or fewer, float32); zero rows padded up to ``min_rows`` keep it at the
    unfused level, at a negligible cost."""
    m = dz.shape[0]
    if m >= min_rows or dz.dtype == torch.float64:
        return dz @ weight
    pad = torch.cat([dz, dz.new_zeros(min_rows - m, dz.shape[1])])
    return (pad @ weight)[:m]


class _FusedHeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, head):
        need = ctx.needs_input_grad
        scalar = plan.reduction != "none"
        grads = scalar and (need[0] or need[1] or need[2])
        sums, none_out, dh, dW, db = _sweep(plan, head, hidden, weight, bias, grads=grads, want_h=need[0],
                                            want_w=need[1], want_b=need[2])
        ctx.plan, ctx.head, ctx.scalar = plan, head, scalar
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(hidden, weight, bias)
        if scalar:
            ctx.grads = (dh, dW, db) if grads else None
            total = torch.zeros((), dtype=torch.float64, device=hidden.device)
            for c, s in zip(plan.coef, sums):
                total = total + c * s
            return total.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        return none_out

    @staticmethod
    def backward(ctx, g):
        need = ctx.needs_input_grad
        if ctx.scalar and ctx.grads is not None:
            # handed over (not kept: autograd can then take them as the .grad without a copy); a second
            # backward through a retained graph sweeps again
            (dh, dW, db), ctx.grads = ctx.grads, None
        elif ctx.scalar:
            hidden, weight, bias = ctx.saved_tensors
            _, _, dh, dW, db = _sweep(ctx.plan, ctx.head, hidden, weight, bias, grads=True, want_h=need[0],
                                      want_w=need[1], want_b=need[2])
        else:
            hidden, weight, bias = ctx.saved_tensors
            _, _, dh, dW, db = _sweep(ctx.plan, ctx.head, hidden, weight, bias, grads=True, want_h=need[0],
                                      want_w=need[1], want_b=need[2], grad_none=g)
            g = None
        out = []
        for t, n, dtype in zip((dh, dW, db), need[:3], ctx.dtypes):
            if not n or t is None:
                out.append(None)
                continue
            if g is not None:
                t = t * g.to(t.dtype)
            out.append(t.to(dtype))
        return out[0], out[1], out[2], None, None


def _run(plan: _Plan, head: LMHead, hidden: torch.Tensor, extra: "_Terms | None" = None) -> torch.Tensor:
    out = _FusedHeadFunction.apply(hidden, head.weight, head.bias, plan, head)
    if extra is not None and extra.terms:
        out = out + extra.reduce(plan.reduction)
    return out


# ---- argument handling shared by the losses ---------------------------------------------------------
def _check_hidden(hidden, head: LMHead, vocab_size: int | None) -> tuple[int, int, int]:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden states must be a floating [batch, length, hidden] tensor, got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if hidden.shape[-1] != head.weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != the output layer's {head.weight.shape[1]}")
    V = head.width if vocab_size is None else int(vocab_size)
    if head.width < V:
        raise ValueError(f"the output layer has {head.width} rows, fewer than the {V} ids of the vocabulary it "
                         f"should score: wrong model or wrong tokenizer")
    return int(hidden.shape[0]), int(hidden.shape[1]), V


def _float(x: torch.Tensor) -> torch.Tensor:
    """The unfused losses' cast (``.float()``), float64 kept (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _ce_term(weight, ids, target, V, Ls) -> _Term:
    qb, qj = torch.nonzero(target, as_tuple=True)
    keep = qj >= 1
    qb, qj = qb[keep], qj[keep]
    if qb.numel():
        _check_target_ids(ids, V, target)
    tgt = ids[qb, qj].clamp(0, max(V - 1, 0))

    def fn(x, local, e):
        return F.cross_entropy(_float(_rows_of(x, local)[:, :V]), tgt[e], reduction="none")
    return _Term(weight, qb * Ls + qj - 1, qb, qj, target.sum(), fn)


def _prepare(hidden, head, student_ids, alignment, student_mask, reduction, temperature, vocab_size):
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    head = LMHead.of(head)
    B, Ls, V = _check_hidden(hidden, head, vocab_size)
    dev = hidden.device
    ids = _check_ids(student_ids, "student_ids", (B, Ls), V).to(dev)
    _check_alignment_ids(alignment, ids, "student")
    target = _token_mask(student_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    return head, temperature, B, Ls, V, dev, ids, target


def _chunk(chunk_size, head):
    return default_chunk_size(head.width) if chunk_size is None else max(1, int(chunk_size))
