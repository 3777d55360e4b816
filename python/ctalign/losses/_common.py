"""Shared pieces of the losses: argument checks, masks, reductions, the teacher-row helpers and the
plain cross-entropy term. The conventions every loss follows are in the ``ctalign.losses`` docstring.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


_REDUCTIONS = ("mean", "sum", "none", "global_mean")
_NEG_INF = float("-inf")


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
    # every row j scores ids[j + 1] (the last row and non-targets: ignored), over the logits as they are:
    # no [B, L - 1, V] copy of them (nor of their gradient) when the logits are float32 and unpadded
    x = logits[..., :vocab_size].float()
    tgt = torch.full((B, L), -100, dtype=torch.long, device=logits.device)
    tgt[:, :-1] = torch.where(target[:, 1:], ids[:, 1:].long(), tgt.new_full((), -100))
    ce = F.cross_entropy(x.reshape(-1, vocab_size), tgt.reshape(-1), ignore_index=-100, reduction="none").view(B, L)
    return torch.cat([out[:, :1], ce[:, :-1]], 1)


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

def _rows_device(rows):
    return rows.indices.device if _is_topk(rows) else rows.device
