"""Argument checks of the ops: temperatures, dense and sparse rows, index tensors; errors name the op."""
from __future__ import annotations

import numpy as np
import torch

from ctalign.errors import NonFiniteLogitsError
from ctalign.ops._types import _FLOAT_DTYPES, TopK


def _check_temperature(op: str, temperature) -> float:
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    return t


def _dense_rows(op: str, logits, n_tokens: int, what: str):
    """logits [..., W] -> ([N, W] with a contiguous last dim, leading shape)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor or a ctalign.TopK, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: logits dtype {logits.dtype} is not float32, bfloat16, float16 or float64")
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must have a last (vocabulary) dimension, got a scalar")
    width = logits.shape[-1]
    if width < n_tokens:
        raise ValueError(f"{op}: logits width {width} is smaller than {what} ({n_tokens} tokens)")
    x = logits.reshape(-1, width)
    if width > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x, tuple(logits.shape[:-1])


def _topk_rows(op: str, topk: TopK, n_tokens: int, what: str, *, deep: bool = True):
    """TopK [..., k] -> (indices int64 [N, k], logprobs [N, k], leading shape), validated (`deep`:
    ids in range and distinct, no NaN/+inf; the compiled CPU path checks those itself)."""
    indices, logprobs = topk
    if not isinstance(indices, torch.Tensor) or not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"{op}: TopK.indices and TopK.logprobs must be torch tensors")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: TopK.indices must be int64 or int32, got {indices.dtype}")
    if logprobs.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: TopK.logprobs dtype {logprobs.dtype} is not float32, bfloat16, float16 or float64")
    if indices.shape != logprobs.shape or indices.dim() < 1:
        raise ValueError(f"{op}: TopK.indices {tuple(indices.shape)} and TopK.logprobs {tuple(logprobs.shape)} "
                         f"must have the same shape [..., k]")
    if indices.device != logprobs.device:
        raise ValueError(f"{op}: TopK.indices is on {indices.device} but TopK.logprobs on {logprobs.device}")
    k = indices.shape[-1]
    if k == 0:
        raise ValueError(f"{op}: TopK rows must keep at least one entry (got k = 0, shape {tuple(indices.shape)})")
    idx = indices.reshape(-1, k).to(torch.int64)
    lp = logprobs.reshape(-1, k)
    if deep and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n_tokens:
            bad = (idx < 0) | (idx >= n_tokens)
            row = int(bad.any(dim=-1).nonzero()[0])
            raise ValueError(f"{op}: TopK row {row}: index {int(idx[bad][0])} is not a token id of {what} "
                             f"({n_tokens} tokens)")
        if k > 1:
            s = idx.sort(dim=-1).values
            dup = s[:, 1:] == s[:, :-1]
            if bool(dup.any()):
                row = int(dup.any(dim=-1).nonzero()[0])
                raise ValueError(f"{op}: TopK row {row} lists a token id more than once")
    bad = torch.isnan(lp) | (lp == float("inf"))  # O(rows x k): on every path, so that one error type names them
    if bool(bad.any()):
        row = int(bad.any(dim=-1).nonzero()[0])
        raise NonFiniteLogitsError(f"{op}: TopK.logprobs row {row} holds NaN or +inf", row)
    return idx, lp, tuple(indices.shape[:-1])


def _index_arg(op: str, name: str, values, upper: int, device: torch.device, what: str) -> torch.Tensor:
    """A 1-d int64 tensor of ids in [0, upper) on `device` (lists, numpy and CPU tensors are moved)."""
    if isinstance(values, torch.Tensor):
        t = values
        if t.device != device and t.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {t.device} but the logits are on {device}")
    else:
        try:
            arr = np.asarray(values)
            t = torch.as_tensor(arr.astype(np.int64) if arr.size == 0 else arr)  # [] has no integer dtype of its own
        except Exception as e:
            raise TypeError(f"{op}: {name} must be a sequence of ints, got {type(values).__name__}") from e
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must hold integer ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-d, got shape {tuple(t.shape)}")
    t = t.to(device, torch.int64)
    if t.numel():
        bad = (t < 0) | (t >= upper)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{op}: {name}[{i}] = {int(t[i])} is outside [0, {upper}) ({what})")
    return t


def _compiled_call(op: str, fn, *args):
    """Runs a compiled sparse-row kernel; its row errors (ValueError) get the op's name."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from None
