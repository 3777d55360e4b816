"""Compact fixed-width encoding of top-k teacher rows.

One position's row is the teacher's ``k`` most likely ids, in decreasing probability (ties to the
smaller id, as :func:`ctalign.ops.topk_logprobs` returns them), and their log-probabilities. Stored:

- **ids**, little-endian, ``id_bytes`` = 2 when the vocabulary has at most 2^16 ids, 3 up to 2^24,
  else 4 (SmolLM2's 49k: 2 bytes; Gemma-3's 262k: 3 bytes);
- **log-probabilities**, one code each (``logprob_codec``):
  - ``q8`` / ``q16``: linear in log space between the row's largest log-probability ``hi`` (stored
    exactly, float32) and its smallest finite one ``lo`` (float32); the top code stands for ``-inf``;
    the largest error is ``(hi - lo) / (2 (2^bits - 2))``;
  - ``f16``: IEEE half precision (error about ``|lp| * 2^-11``);
  - ``f32``: exact;
- per position, the log of the kept mass ``log sum_i p_i`` (float32, exact). Decoding shifts the
  decoded log-probabilities so that their mass equals it, so the tail mass ``1 - kept`` is exact.

Fixed widths keep every row at a known offset, so a memory-mapped shard is read row by row without
decompressing anything. Bytes per position: ``k * (id_bytes + code_bytes) + 4`` (+ 8 for ``hi`` and
``lo`` with ``q8``/``q16``). At k = 64: 196 B (49k vocabulary, ``q8``) to 264 B (262k, ``q8``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOGPROB_CODECS = ("q8", "q16", "f16", "f32")
_CODE_BYTES = {"q8": 1, "q16": 2, "f16": 2, "f32": 4}


def id_bytes_for(vocab_size: int) -> int:
    if vocab_size <= 1 << 16:
        return 2
    if vocab_size <= 1 << 24:
        return 3
    return 4


@dataclass(frozen=True)
class RowCodec:
    """How rows of ``k`` entries of a ``vocab_size`` vocabulary are stored."""

    k: int
    vocab_size: int
    logprob_codec: str = "q8"

    def __post_init__(self):
        if self.logprob_codec not in LOGPROB_CODECS:
            raise ValueError(f"logprob codec must be one of {', '.join(LOGPROB_CODECS)}, got {self.logprob_codec!r}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"top-k must be between 1 and the vocabulary size {self.vocab_size}, got {self.k}")

    @property
    def id_bytes(self) -> int:
        return id_bytes_for(self.vocab_size)

    @property
    def quantized(self) -> bool:
        return self.logprob_codec in ("q8", "q16")

    def bytes_per_position(self) -> int:
        """Stored bytes of one position's row (ids, codes, kept mass, and the range if quantized)."""
        return self.k * (self.id_bytes + _CODE_BYTES[self.logprob_codec]) + 4 + (8 if self.quantized else 0)

    def describe(self) -> dict:
        return {"k": self.k, "vocab_size": self.vocab_size, "id_bytes": self.id_bytes,
                "logprob_codec": self.logprob_codec}

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        """``ids`` int [T, k] and ``logprobs`` float [T, k] (finite or -inf, each row's first entry the
        largest) -> the arrays of a shard: ``ids`` uint8 [T, k * id_bytes], ``codes``, ``kept`` f32 [T]
        (and ``hi``, ``lo`` f32 [T] when quantized)."""
        ids = np.asarray(ids)
        lp = np.asarray(logprobs, dtype=np.float64)
        if ids.ndim != 2 or ids.shape[1] != self.k or lp.shape != ids.shape:
            raise ValueError(f"rows must be [positions, {self.k}] ids and log-probabilities, got "
                             f"{ids.shape} and {lp.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if np.isnan(lp).any() or np.isposinf(lp).any():
            raise ValueError("log-probabilities hold NaN or +inf")
        if lp.size and np.isneginf(lp[:, 0]).any():
            raise ValueError("a row has no mass (its largest log-probability is -inf)")
        out: dict[str, np.ndarray] = {}
        raw = ids.astype("<u4").view(np.uint8).reshape(ids.shape[0], self.k, 4)[:, :, : self.id_bytes]
        out["ids"] = np.ascontiguousarray(raw).reshape(ids.shape[0], self.k * self.id_bytes)
        with np.errstate(divide="ignore", invalid="ignore"):
            kept = np.log(np.exp(lp).sum(axis=1)) if lp.size else np.zeros(0)
        out["kept"] = kept.astype(np.float32)
        if self.quantized:
            levels = (1 << (8 * _CODE_BYTES[self.logprob_codec])) - 2  # top code: -inf
            finite = np.isfinite(lp)
            hi = lp[:, 0] if lp.size else np.zeros(0)
            lo = np.where(finite, lp, np.inf).min(axis=1) if lp.size else np.zeros(0)
            span = np.maximum(hi - lo, 0.0)
            scale = np.where(span > 0, levels / np.where(span > 0, span, 1.0), 0.0)
            codes = np.rint((hi[:, None] - np.where(finite, lp, hi[:, None])) * scale[:, None])
            codes = np.clip(codes, 0, levels)
            codes = np.where(finite, codes, levels + 1)
            dtype = np.uint8 if self.logprob_codec == "q8" else np.dtype("<u2")
            out["codes"] = codes.astype(dtype)
            out["hi"] = hi.astype(np.float32)
            out["lo"] = lo.astype(np.float32)
        else:
            out["codes"] = lp.astype("<f2" if self.logprob_codec == "f16" else "<f4")
        return out

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of :meth:`encode`: (ids int64 [T, k], logprobs float32 [T, k])."""
        raw = np.asarray(arrays["ids"], dtype=np.uint8)
        T = raw.shape[0]
        wide = np.zeros((T, self.k, 4), dtype=np.uint8)
        wide[:, :, : self.id_bytes] = raw.reshape(T, self.k, self.id_bytes)
        ids = wide.view("<u4").reshape(T, self.k).astype(np.int64)
        codes = np.asarray(arrays["codes"])
        if self.quantized:
            levels = (1 << (8 * _CODE_BYTES[self.logprob_codec])) - 2
            hi = np.asarray(arrays["hi"], dtype=np.float64)[:, None]
            lo = np.asarray(arrays["lo"], dtype=np.float64)[:, None]
            c = codes.astype(np.float64)
            lp = np.where(c > levels, -np.inf, hi - (hi - lo) * c / levels)
        else:
            lp = codes.astype(np.float64)
        kept = np.asarray(arrays["kept"], dtype=np.float64)
        if T:
            with np.errstate(divide="ignore"):
                mass = np.log(np.exp(lp).sum(axis=1))
            lp = lp + (kept - mass)[:, None]
        return ids, lp.astype(np.float32)


def reconstruction_error(codec: RowCodec, ids: np.ndarray, logprobs: np.ndarray,
                         dense_logprobs: np.ndarray | None = None) -> dict:
    """How far decoded rows are from the rows given: max and mean absolute log-probability error over
    the finite entries, and, with the dense rows, the mean KL(dense || cached), the cached row
    spreading its tail mass over the ids it did not keep in proportion to the dense row: the error the
    encoding adds, not the top-k truncation's (that one is the loss's choice of what to do with the
    tail)."""
    arrays = codec.encode(ids, logprobs)
    got_ids, got = codec.decode(arrays)
    assert np.array_equal(got_ids, np.asarray(ids))
    want = np.asarray(logprobs, dtype=np.float64)
    finite = np.isfinite(want)
    err = np.abs(got.astype(np.float64)[finite] - want[finite])
    out = {"max_abs_logprob_error": float(err.max()) if err.size else 0.0,
           "mean_abs_logprob_error": float(err.mean()) if err.size else 0.0}
    if dense_logprobs is not None:
        dense = np.asarray(dense_logprobs, dtype=np.float64)
        p = np.exp(dense)
        rows = np.arange(dense.shape[0])[:, None]
        kept_true = p[rows, ids].sum(axis=1)

        def kl_with(kept_lp):
            q = p * ((1 - np.exp(kept_lp).sum(axis=1)) / np.maximum(1 - kept_true, 1e-300))[:, None]
            q[rows, ids] = np.exp(kept_lp)
            with np.errstate(divide="ignore", invalid="ignore"):
                terms = np.where(p > 0, p * (dense - np.log(np.maximum(q, 1e-300))), 0.0)
            return float(terms.sum(axis=1).mean())

        out["mean_kl_encoding"] = kl_with(got.astype(np.float64))
    return out
