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
                                    _shifted_ce, _Terms, _teacher_rows, _is_topk, _select_rows)


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


BYTE_TARGETS = ("exact", "boundary")


def _check_byte_targets(targets) -> str:
    if targets not in BYTE_TARGETS:
        raise ValueError(f"targets must be one of {BYTE_TARGETS}, got {targets!r}")
    return targets


def byte_targets(teacher_logits, teacher_vocab, alignment, num_bytes: int, *, temperature: float = 1.0,
                 targets: str = "exact", width: int | None = None, where=None):
    """The teacher's next-byte distribution at byte ``i < num_bytes`` of every student token:
    ``(logprobs [B, Ls, K, 256], valid [B, Ls, K] bool)`` (float64 for float64 logits, else float32;
    ``-inf`` rows where ``valid`` is False). Needs ``align(..., byte_queries >= K)``.

    The byte at text offset ``x`` lies in teacher token ``t_k`` after its first bytes ``π``
    (``alignment.byte_row`` = ``k - 1``, ``byte_prefix`` = the node of ``π``).

    * ``targets="exact"`` (default): the exact next byte over the covers that keep the teacher's own
      tokenization up to ``t_{k-1}`` (``docs/design.md``). At a token start (``π`` empty) ``t_{k-1}``
      either goes on or ends: ``q(b) = C[b] + C[end] * N[b]`` with ``C =
      byte_conditional_logprobs(row k - 2, bytes(t_{k-1}))`` and ``N = next_byte_logprobs(row k - 1)``;
      after a teacher special (or for the first teacher token, which has no row before it) ``N``.
      Inside a token, ``byte_conditional_logprobs(row k - 1, π, drop_end=True)``: the covers in
      which a shorter teacher token ends at ``π`` need a row no forward pass computed, and are left
      out (so are the covers with a token spanning earlier teacher tokens).
    * ``targets="boundary"``: ``byte_conditional_logprobs(row k - 1, π, drop_end=True)`` everywhere
      (at a token start: the next teacher token's first byte, as if ``t_{k-1}`` surely ended there).

    Both drop the specials' mass (no byte) and renormalise over the 256 bytes. ``where`` [B, Ls, K]
    bool: build only those queries. ``width``: the student length to pad/crop to."""
    from ctalign.losses.likelihood import compose_rows
    temperature = _check_temperature(temperature)
    kind = _check_byte_targets(targets)
    K = int(num_bytes)
    if alignment is None or alignment.byte_row.shape[-1] < K:
        raise ValueError(f"BLD needs align(..., byte_queries={K}) (alignment with byte queries for K bytes)")
    t_rows, Bt, Lt = _teacher_rows(teacher_logits)
    if not _is_topk(teacher_logits):
        _check_logits(teacher_logits, "teacher logits", len(teacher_vocab))
    rdev = _rows_device(t_rows)
    lp_src = t_rows.logprobs if _is_topk(t_rows) else t_rows
    dtype = torch.float64 if lp_src.dtype == torch.float64 else torch.float32
    Ls = alignment.byte_row.shape[1] if width is None else int(width)
    if alignment.byte_row.shape[0] != Bt:
        raise ValueError(f"teacher batch {Bt} != student batch {alignment.byte_row.shape[0]}")
    brow = _fit(alignment.byte_row[..., :K].to(rdev), Ls, -1)
    bpre = _fit(alignment.byte_prefix[..., :K].to(rdev), Ls, -1)
    ok = (brow >= 0) & (bpre >= 0)
    if where is not None:
        ok = ok & where.to(rdev)
    out = torch.full((Bt, Ls, K, 256), float("-inf"), dtype=dtype, device=rdev)
    qb, qj, qi = torch.nonzero(ok, as_tuple=True)
    if qb.numel() == 0:
        return out, ok
    ops = _ops()
    r, pre = brow[qb, qj, qi], bpre[qb, qj, qi]
    with torch.no_grad():
        lp = ops.byte_conditional_logprobs(t_rows, teacher_vocab, qb * Lt + r, pre, temperature=temperature,
                                           drop_end=True).to(dtype)
        if kind == "exact" and alignment.teacher_ids is not None:
            # token starts after a teacher token with bytes that has a row before it: compose
            t_role = alignment.t_role.to(rdev)
            t_ids = alignment.teacher_ids.to(rdev)
            start = (pre == 0) & (r >= 1)
            if start.any():
                rc = r.clamp(max=t_role.shape[1] - 1)
                start = start & (t_role[qb, rc] == 0)
            if start.any():
                sb, sr = qb[start], r[start]
                prev_id = t_ids[sb, sr].long()
                node = _member_nodes(teacher_vocab, rdev)[prev_id]
                c = ops.byte_conditional_logprobs(t_rows, teacher_vocab, sb * Lt + sr - 1, node,
                                                  temperature=temperature).to(dtype)
                uniq, inv = torch.unique(sb * Lt + sr, return_inverse=True)
                n = ops.next_byte_logprobs(_select_rows(t_rows, uniq), teacher_vocab,
                                           temperature=temperature).to(dtype)[inv]
                q = compose_rows(c, n)[:, :256]
                z = torch.logsumexp(q, -1, keepdim=True)
                lp[start] = torch.where(torch.isfinite(z), q - z, torch.full_like(q, float("-inf")))
    out[qb, qj, qi] = lp[:, :256]
    valid = torch.zeros_like(ok)
    valid[qb, qj, qi] = torch.isfinite(lp[:, :256]).any(-1)
    return out, valid


def _member_nodes(vocab, device) -> torch.Tensor:
    """int64 [V]: the byte-trie node of each token's full bytes (-1 without bytes), cached per device."""
    key = (id(vocab), getattr(vocab, "fingerprint", None), str(device))
    t = _MEMBER_NODE_CACHE.get(key)
    if t is None:
        t = _MEMBER_NODE_CACHE[key] = torch.from_numpy(np.array(vocab.trie.member_node, dtype=np.int64)).to(device)
    return t


_MEMBER_NODE_CACHE: dict = {}


def byte_level_distillation_loss(student_logits: torch.Tensor, head_logits: torch.Tensor, teacher_logits,
                                 student_ids, alignment, *, student_vocab, teacher_vocab, student_mask=None,
                                 lambda_b: float = 1.0, lambda_kl: float = 0.1, ce_weight: float = 1.0,
                                 temperature: float = 1.0, reduction: str = "mean",
                                 targets: str = "exact") -> torch.Tensor:
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
    _check_byte_targets(targets)
    Vs = _check_logits(student_logits, "student logits", len(student_vocab))
    B, Ls, _ = student_logits.shape
    if head_logits.dim() != 4 or tuple(head_logits.shape[:2]) != (B, Ls) or head_logits.shape[-1] != 257:
        raise ValueError(f"head logits must be [batch, length, K, 257] with batch, length = {(B, Ls)}, "
                         f"got {tuple(head_logits.shape)}")
    dev = student_logits.device
    ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(dev)
    _check_alignment_ids(alignment, ids, "student")
    target = _token_mask(student_mask, _alignment_lengths(alignment, "student"), (B, Ls), dev)
    terms = _Terms(student_logits)
    terms.add(ce_weight, _shifted_ce(student_logits, ids, Vs, target), target.sum())
    _add_byte_head_terms(terms, head_logits, teacher_logits, ids, target, alignment, student_vocab=student_vocab,
                         teacher_vocab=teacher_vocab, lambda_b=lambda_b, lambda_kl=lambda_kl,
                         temperature=temperature, targets=targets)
    return terms.reduce(reduction)


def _add_byte_head_terms(terms: _Terms, head_logits: torch.Tensor, teacher_logits, ids: torch.Tensor,
                         target: torch.Tensor, alignment, *, student_vocab, teacher_vocab, lambda_b: float,
                         lambda_kl: float, temperature: float, targets: str) -> None:
    """BLD's byte-head terms into ``terms``: ``lambda_b x`` the byte CE (head row ``j-1`` against the
    first ``K`` bytes of token ``j``) and ``lambda_kl x`` the KL to the teacher's next-byte targets.
    Shared by :func:`byte_level_distillation_loss` and its fused form."""
    B, Ls, K, _ = head_logits.shape
    Vs, dev = len(student_vocab), ids.device
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
    # KL to the teacher's next-byte distributions
    kl = head_logits.new_zeros((B, Ls), dtype=torch.float32)
    n_kl = 0
    if lambda_kl != 0.0 and Ls > 1:
        ok = target[:, :, None] & (bt >= 0) & (bt < 256)
        ok[:, 0] = False
        lp, valid = byte_targets(teacher_logits, teacher_vocab, alignment, K, temperature=temperature,
                                 targets=targets, width=Ls, where=ok)
        qb, qj, qi = torch.nonzero(valid.to(dev) & ok, as_tuple=True)
        if qb.numel():
            lp = lp.to(dev)[qb, qj, qi].float()
            head_lp = torch.log_softmax(head_logits[qb, qj - 1, qi].float() / temperature, -1)[:, :256]
            p = lp.exp()
            v = torch.where(p > 0, p * (lp - head_lp), torch.zeros_like(p)).sum(-1)
            kl = kl.index_put((qb, qj), v, accumulate=True)
            n_kl = qb.numel()
    terms.add(lambda_kl, kl + anchor_head, n_kl)


class ByteLevelDistillationLoss(nn.Module):
    """Module form of :func:`byte_level_distillation_loss` (defaults lambda_b = 1, lambda_kl = 0.1).

    Holds no parameters: the :class:`ByteHead` is the caller's (train it with the student)."""

    def __init__(self, student_vocab, teacher_vocab, *, num_bytes: int = 10, lambda_b: float = 1.0,
                 lambda_kl: float = 0.1, ce_weight: float = 1.0, temperature: float = 1.0, reduction: str = "mean",
                 targets: str = "exact"):
        super().__init__()
        _check_reduction(reduction)
        self.targets = _check_byte_targets(targets)
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
            lambda_kl=self.lambda_kl, ce_weight=self.ce_weight, temperature=self.temperature, reduction=self.reduction,
            targets=self.targets)

    def extra_repr(self) -> str:
        return (f"targets={self.targets!r}, num_bytes={self.num_bytes}, lambda_b={self.lambda_b}, lambda_kl={self.lambda_kl}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")
