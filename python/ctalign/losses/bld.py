"""BLD, byte-level distillation: a small byte head on the student predicts the next bytes, trained on
the teacher's next-byte conditionals (``docs/design.md``, the byte space and trie ranges).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ctalign.losses._common import (_rows_device, _ops, _check_reduction, _check_temperature, _check_logits,
                                    _check_ids, _fit, _token_mask, _check_alignment_ids, _alignment_lengths,
                                    _shifted_ce, _Terms, _teacher_rows, _is_topk)


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
