"""Row masks against whitespace collapse, for every loss.

BPM's authors report that a code student collapsed (pass@8 49% -> 9%) until the distillation target
was withheld at the rows where the student's realised token is made only of spaces and tabs (about
3.5% of aligned code rows). :func:`whitespace_row_mask` gives that mask; :func:`combine_row_masks`
merges it with a user-supplied row mask and the usual token mask.

A row mask is indexed like ``student_mask``: ``[B, Ls]`` over student *tokens*, entry ``j`` for the
row ``j - 1`` that predicts token ``j``; ``True`` keeps the distillation target there.

* BPM, ESCD and strict-alignment KD take ``row_mask=`` and ``mask_whitespace=`` and withhold only
  their distillation terms (their optional cross-entropy term keeps ``student_mask``). Defaults:
  ``mask_whitespace=True`` for BPM (as its authors ship it) and for ESCD (it contains BPM's root
  term; the child term of a row goes with its root), ``False`` for strict-alignment KD (its paper
  does not use the mask).
* The other losses (ULD, BLD, likelihood, ALM) take the mask through ``student_mask``:
  ``student_mask=combine_row_masks(batch["student_loss_mask"], whitespace_row_mask(ids, amap))``
  (which withholds their cross-entropy term at those rows too).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["whitespace_tokens", "whitespace_row_mask", "combine_row_masks", "WHITESPACE"]

#: The bytes a token must consist of to count as whitespace (space and tab, as BPM defines it).
WHITESPACE = b" \t"


def _student_table(vocab_or_map):
    if hasattr(vocab_or_map, "student_table") and hasattr(vocab_or_map, "first_student"):
        return vocab_or_map.student_table
    if hasattr(vocab_or_map, "table"):
        return vocab_or_map.table
    if hasattr(vocab_or_map, "offsets") and hasattr(vocab_or_map, "data"):
        return vocab_or_map
    raise TypeError(f"expected an AlignmentMap (its student side), a Vocab or a TokenTable, got "
                    f"{type(vocab_or_map).__name__}")


def whitespace_tokens(vocab_or_map, chars: bytes = WHITESPACE) -> np.ndarray:
    """bool[V]: the tokens whose bytes are non-empty and all in ``chars`` (specials: False).
    ``vocab_or_map``: a student Vocab, an AlignmentMap (its student side) or a TokenTable. Cached."""
    chars = bytes(chars)
    table = _student_table(vocab_or_map)
    store = getattr(vocab_or_map, "__dict__", None)
    cache = store.setdefault("_ctalign_whitespace_tokens", {}) if isinstance(store, dict) else {}
    if chars in cache:
        return cache[chars]
    off = np.asarray(table.offsets).astype(np.int64)
    data = np.asarray(table.data)
    ok_byte = np.zeros(256, dtype=bool)
    ok_byte[list(chars)] = True
    bad = (~ok_byte[data]).astype(np.int64)
    n = len(off) - 1
    bad_count = np.add.reduceat(bad, np.minimum(off[:-1], max(len(bad) - 1, 0))) if len(bad) else np.zeros(n, np.int64)
    length = off[1:] - off[:-1]
    out = (length > 0) & (np.where(length > 0, bad_count, 1) == 0)
    cache[chars] = out
    return out


def whitespace_row_mask(student_ids, vocab_or_map, *, chars: bytes = WHITESPACE) -> torch.Tensor:
    """bool ``[B, Ls]``: False where the student's realised token ``j`` is made only of ``chars``
    (spaces and tabs by default), True elsewhere; on ``student_ids``' device. Ids outside the
    vocabulary (padding beyond the lengths, e.g. -1) count as kept."""
    ids = student_ids if isinstance(student_ids, torch.Tensor) else torch.as_tensor(np.asarray(student_ids))
    ws = torch.from_numpy(whitespace_tokens(vocab_or_map, chars)).to(ids.device)
    inside = (ids >= 0) & (ids < ws.numel())
    return ~(inside & ws[ids.long().clamp(0, max(ws.numel() - 1, 0))])


def combine_row_masks(*masks) -> torch.Tensor | None:
    """The logical AND of the given ``[B, Ls]`` masks (``None`` entries skipped; all None: None)."""
    out = None
    for m in masks:
        if m is None:
            continue
        m = torch.as_tensor(m).bool()
        if out is not None and tuple(m.shape) != tuple(out.shape):
            raise ValueError(f"row masks must all be [batch, length]: got {tuple(out.shape)} and {tuple(m.shape)}")
        out = m if out is None else out & m.to(out.device)
    return out


def _kept_rows(student_ids, amap, shape, device, row_mask, mask_whitespace: bool) -> torch.Tensor:
    """bool [B, Ls] of the rows a distillation term may use (the losses' helper)."""
    B, L = shape
    keep = torch.ones(B, L, dtype=torch.bool, device=device)
    if row_mask is not None:
        rm = torch.as_tensor(row_mask, device=device)
        if tuple(rm.shape) != (B, L):
            raise ValueError(f"row_mask must be [batch, length] = {(B, L)}, got {tuple(rm.shape)}")
        keep &= rm.bool()
    if mask_whitespace:
        keep &= whitespace_row_mask(student_ids, amap).to(device)
    return keep
