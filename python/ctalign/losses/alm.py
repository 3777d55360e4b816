"""ALM, approximate likelihood matching (Minixhofer et al., 2025): the chunk log-likelihoods of the two
models over aligned chunks, matched with a binarised f-divergence.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ctalign.losses._common import (_NEG_INF, _check_reduction, _check_temperature, _check_logits, _check_ids,
                                    _vocab_len, _fit, _token_mask, _check_alignment_ids, _Terms, _is_topk)


_BOUNDARY_CACHE: dict = {}


def boundary_token_mask(vocab) -> torch.Tensor:
    """bool[V]: tokens that begin at a word boundary (bytes starting with whitespace) or have no
    bytes (specials, e.g. eos). Used by ALM's debiasing. Cached per vocabulary."""
    key = (id(vocab), getattr(vocab, "fingerprint", None))
    m = _BOUNDARY_CACHE.get(key)
    if m is None:
        offsets, data, _ = vocab.byte_table()
        offsets = np.asarray(offsets)
        data = np.asarray(data)
        V = len(offsets) - 1
        has = offsets[1:] > offsets[:-1]
        first = np.zeros(V, dtype=np.uint8)
        first[has] = data[offsets[:-1][has]]
        ws = np.isin(first, np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8))
        if getattr(vocab, "word_start", None) is not None:
            ws = ws | np.asarray(vocab.word_start, dtype=bool)
        m = torch.from_numpy((~has) | (has & ws))
        _BOUNDARY_CACHE[key] = m
    return m


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log p(ids[j] | row j-1) [B, L] (0 at j = 0)."""
    B, L, _ = logits.shape
    if L < 2:
        return logits.new_zeros((B, L), dtype=torch.float32) + logits.sum() * 0.0
    x = logits[:, :-1, :vocab_size].float() / temperature
    lp = x.gather(-1, ids[:, 1:, None].clamp(0, vocab_size - 1)).squeeze(-1) - torch.logsumexp(x, -1)
    return torch.cat([lp.new_zeros((B, 1)), lp], 1)


def chunk_logprobs(logits: torch.Tensor, ids, chunk: torch.Tensor, target: torch.Tensor, n_chunks: int,
                   vocab_size: int, temperature: float = 1.0):
    """(sum of token log-probs per chunk [B, C], chunk has a token that is no target [B, C] bool,
    index of each chunk's last token [B, C] (-1 if none))."""
    return _chunk_sums(_token_logprobs(logits, ids, vocab_size, temperature), chunk, target, n_chunks)


def _chunk_sums(lp: torch.Tensor, chunk: torch.Tensor, target: torch.Tensor, n_chunks: int):
    """:func:`chunk_logprobs` from the token log-probs ``lp`` [B, L] (row j: log p(token j | row j-1))."""
    B, L = lp.shape
    dev = lp.device
    inc = chunk >= 0
    c = chunk.clamp_min(0)
    sums = torch.zeros((B, n_chunks), dtype=torch.float32, device=dev)
    sums = sums.scatter_add(1, c, torch.where(inc & target, lp, torch.zeros_like(lp)))
    bad = torch.zeros((B, n_chunks), dtype=torch.long, device=dev)
    bad = bad.scatter_add(1, c, (inc & ~target).long())
    last = torch.full((B, n_chunks), -1, dtype=torch.long, device=dev)
    pos = torch.arange(L, device=dev)[None].expand(B, L)
    last = last.scatter_reduce(1, c, torch.where(inc, pos, torch.full_like(pos, -1)), reduce="amax")
    return sums, bad > 0, last


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def alm_loss(student_logits: torch.Tensor, teacher_logits, student_ids, teacher_ids, alignment, *,
             student_mask=None, teacher_mask=None, tau: float = 100.0, temperature: float = 1.0,
             debias: bool = False, student_vocab=None, teacher_vocab=None, reduction: str = "mean",
             eps: float = 1e-6, teacher_own_logprob: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate likelihood matching: for every chunk (the span between two common boundaries) the
    teacher's and the student's log-likelihoods ``l_T``, ``l_S`` (sums of the token log-probs of the
    chunk), compared by the binary cross-entropy of ``y = exp(l / tau)``:
    ``-(y_T log y_S + (1 - y_T) log(1 - y_S))``, with ``eps`` subtracted from ``l / tau`` so that a
    likelihood of 1 stays finite. Its minimum over ``l_S`` is at ``l_S = l_T`` (the value there is
    the binary entropy of ``y_T``, not 0).

    Chunks count when every token of both sides in them is a target (token 0, masked or padding
    tokens exclude a chunk) and both sides have a token there; matched special pairs (e.g. eos) are
    chunks too. ``debias``: add to each side's chunk log-likelihood the log-probability, at the row
    after the chunk's last token, that the next token starts at a word boundary
    (:func:`boundary_token_mask`: whitespace-initial tokens and specials; needs the vocabularies),
    i.e. that the tokenization really breaks after the chunk. What ALM drops: the likelihood of a
    chunk is the probability of one tokenization of it (the model's own), not the marginal over all
    its tokenizations; ``debias`` corrects only the boundary at its end.

    From a teacher cache (:mod:`ctalign.cache`): pass ``teacher_own_logprob`` ``[B, Lt]``, the
    log-probability of the teacher's own next token at each row (``batch["teacher_own_logprob"]``),
    with ``teacher_logits=None`` or the cached ``TopK`` rows; the chunk likelihoods are then exact
    (they need nothing else) at the cache's temperature (``temperature`` applies to the student only),
    and ``debias`` is refused (it needs whole teacher rows).
    """
    _check_reduction(reduction)
    temperature = _check_temperature(temperature)
    tau = _check_temperature(tau, "tau")
    cached = teacher_own_logprob is not None
    if cached:
        if debias:
            raise ValueError("debias=True needs the teacher's dense logits, not cached teacher_own_logprob")
        own = torch.as_tensor(teacher_own_logprob).detach().float()
        if own.dim() != 2:
            raise ValueError(f"teacher_own_logprob must be [batch, teacher length], got {tuple(own.shape)}")
        if torch.isnan(own).any() or torch.isposinf(own).any():
            raise ValueError("teacher_own_logprob holds NaN or +inf")
        Bt, Lt = own.shape
        Vt = _vocab_len(teacher_vocab) or int(torch.as_tensor(teacher_ids).max().item()) + 1
    elif _is_topk(teacher_logits):
        raise TypeError("ALM needs the teacher's dense logits (the log-prob of every teacher token of the text), "
                        "or teacher_own_logprob from a teacher cache")
    else:
        Vt = _check_logits(teacher_logits, "teacher logits", _vocab_len(teacher_vocab))
        Bt, Lt, _ = teacher_logits.shape
    Vs = _check_logits(student_logits, "student logits", _vocab_len(student_vocab))
    B, Ls, _ = student_logits.shape
    if Bt != B:
        raise ValueError(f"teacher batch {Bt} != student batch {B}")
    if alignment is None:
        raise ValueError("ALM needs the alignment (ctalign.align.align) of the two tokenizations")
    dev = student_logits.device
    s_ids = _check_ids(student_ids, "student_ids", (B, Ls), Vs).to(dev)
    t_ids = _check_ids(teacher_ids, "teacher_ids", (B, Lt), Vt).to(dev)
    _check_alignment_ids(alignment, s_ids, "student")
    _check_alignment_ids(alignment, t_ids, "teacher")
    s_t = _token_mask(student_mask, alignment.student_lengths, (B, Ls), dev)
    t_t = _token_mask(teacher_mask, alignment.teacher_lengths, (B, Lt), dev)
    C = max(int(alignment.n_chunks.max().item()) if alignment.n_chunks.numel() else 0, 1)
    s_chunk = _fit(alignment.s_chunk.to(dev), Ls, -1)
    t_chunk = _fit(alignment.t_chunk.to(dev), Lt, -1)
    ls, s_bad, s_last = chunk_logprobs(student_logits, s_ids, s_chunk, s_t, C, Vs, temperature)
    with torch.no_grad():
        if cached:
            token_lp = torch.cat([own.new_zeros((B, 1)), own[:, :-1]], 1).to(dev)
            lt, t_bad, t_last = _chunk_sums(token_lp, t_chunk, t_t, C)
        else:
            t_logits = teacher_logits.detach().to(dev)
            lt, t_bad, t_last = chunk_logprobs(t_logits, t_ids, t_chunk, t_t, C, Vt, temperature)
    cs = alignment.chunk_s_count[:, :C].to(dev)
    ct = alignment.chunk_t_count[:, :C].to(dev)
    if cs.shape[1] < C:
        cs = F.pad(cs, (0, C - cs.shape[1]))
        ct = F.pad(ct, (0, C - ct.shape[1]))
    valid = ~s_bad & ~t_bad & (cs > 0) & (ct > 0) & (s_last >= 0) & (t_last >= 0)
    if debias:
        if student_vocab is None or teacher_vocab is None:
            raise ValueError("debias=True needs student_vocab and teacher_vocab")
        ls = ls + _boundary_logprob(student_logits, s_last, boundary_token_mask(student_vocab).to(dev), Vs, temperature)
        with torch.no_grad():
            lt = lt + _boundary_logprob(t_logits, t_last, boundary_token_mask(teacher_vocab).to(dev), Vt, temperature)
    ls = ls.clamp_max(0.0)
    lt = lt.clamp_max(0.0)
    a = lt / tau - eps
    b = ls / tau - eps
    bce = -(a.exp() * b + (-torch.expm1(a)) * _log1mexp(b))
    per = torch.where(valid, bce, torch.zeros_like(bce))
    terms = _Terms(student_logits)
    terms.add(1.0, per, valid.sum())
    return terms.reduce(reduction)


def _boundary_logprob(logits, last, mask, vocab_size, temperature):
    """log P(next token starts at a boundary) at the row of each chunk's last token [B, C]."""
    B, L, _ = logits.shape
    if L == 0:
        return torch.zeros(last.shape, dtype=torch.float32, device=logits.device) + logits.sum() * 0.0
    row = last.clamp(0, L - 1)
    x = logits[torch.arange(B, device=logits.device)[:, None], row, :vocab_size].float() / temperature
    lse = torch.logsumexp(x, -1)
    lb = torch.logsumexp(x.masked_fill(~mask[:vocab_size], _NEG_INF), -1) - lse
    return torch.where(last >= 0, lb, torch.zeros_like(lb))


class ApproximateLikelihoodMatchingLoss(nn.Module):
    """Module form of :func:`alm_loss` (tau = 100 by default)."""

    def __init__(self, *, tau: float = 100.0, temperature: float = 1.0, debias: bool = False, student_vocab=None,
                 teacher_vocab=None, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.tau = _check_temperature(tau, "tau")
        self.temperature = _check_temperature(temperature)
        self.debias, self.student_vocab, self.teacher_vocab, self.reduction = debias, student_vocab, teacher_vocab, reduction
        if debias and (student_vocab is None or teacher_vocab is None):
            raise ValueError("debias=True needs student_vocab and teacher_vocab")

    def forward(self, student_logits, teacher_logits, student_ids, teacher_ids, alignment, student_mask=None,
                teacher_mask=None, teacher_own_logprob=None):
        return alm_loss(student_logits, teacher_logits, student_ids, teacher_ids, alignment,
                        student_mask=student_mask, teacher_mask=teacher_mask, tau=self.tau,
                        temperature=self.temperature, debias=self.debias, student_vocab=self.student_vocab,
                        teacher_vocab=self.teacher_vocab, reduction=self.reduction,
                        teacher_own_logprob=teacher_own_logprob)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, temperature={self.temperature}, debias={self.debias}, reduction={self.reduction!r}"
