"""CPU backend of the projection ops: torch tensors in and out around the compiled ``_core`` kernels.

Functions and layouts are those of ``docs/ARCHITECTURE.md`` ("Kernel backends"); tensors are handed
to the kernels as zero-copy numpy views (bf16 as its int16 bits) and the results come back as
tensors sharing the kernels' buffers. The kernels release the GIL, run on
:func:`num_threads` threads and pick their instruction set at run time
(``ctalign._core.kernel_isa()``).

Sparse rows (``topk_*``) are extras of this backend: ops.py runs them here for CPU tensors (the
forward only; their backward is the pure-torch reference's, O(k) per row).

Output dtype: float32 for float32/bfloat16/float16 logits; float64 logits run a float64 path (double
precision throughout, used by gradcheck) and give float64. Rows whose used columns hold NaN or
+-inf come back with ``lse`` NaN (and NaN outputs): the caller checks ``lse`` and raises.
"""
from __future__ import annotations

import torch

try:
    from ctalign import _core
except ImportError:  # pragma: no cover - the package is unusable without its core, but stay importable
    _core = None

__all__ = [
    "available", "full_output", "grouped_logmass", "grouped_logmass_backward", "range_logmass", "range_logmass_backward",
    "topk_grouped_logmass", "topk_grouped_sparse", "topk_logprobs", "topk_logprobs_backward", "topk_trie_sparse",
    "topk_cover_sparse", "trie_conditional_logprobs", "trie_conditional_logprobs_backward", "num_threads",
    "set_num_threads", "kernel_isa", "set_kernel_isa", "sorted_l1_distance", "sorted_l1_logits",
]

_ELEM_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
_threads: int | None = None


def available() -> bool:
    """True when the compiled kernels are importable."""
    return _core is not None and hasattr(_core, "grouped_logmass")


def num_threads() -> int:
    """Threads the kernels use: :func:`set_num_threads`'s value, else ``torch.get_num_threads()``."""
    return _threads if _threads is not None else torch.get_num_threads()


def set_num_threads(n: int | None) -> None:
    """Fix the kernels' thread count (None: follow ``torch.get_num_threads()`` again)."""
    global _threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads: expected a positive int or None, got {n!r}")
    _threads = n


def kernel_isa() -> str:
    """Instruction set in use: ``scalar``, ``avx2`` or ``avx512``."""
    return _core.kernel_isa()


def set_kernel_isa(name: str | None) -> None:
    """Force an instruction set (tests, benchmarks); None restores the best this CPU runs."""
    _core.set_kernel_isa(_core.best_kernel_isa() if name is None else name)


def _logits_view(logits: torch.Tensor):
    try:
        elem_type = _ELEM_TYPES[logits.dtype]
    except KeyError:
        raise TypeError(f"logits: dtype {logits.dtype} is not float32, bfloat16, float16 or float64") from None
    if logits.device.type != "cpu":
        raise ValueError(f"logits: the CPU backend needs CPU tensors, got {logits.device}")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [rows, width], got shape {tuple(logits.shape)}")
    x = logits.detach()
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy(), elem_type
    return x.numpy(), elem_type


def _np(t: torch.Tensor | None, dtype: torch.dtype):
    if t is None:
        return None
    return t.detach().to("cpu", dtype).contiguous().numpy()


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def grouped_logmass(logits, vocab_size, group, n_groups, temperature):
    x, elem_type = _logits_view(logits)
    out, lse = _core.grouped_logmass(x, elem_type, int(vocab_size), _np(group, torch.int32), int(n_groups),
                                     float(temperature), num_threads())
    return torch.from_numpy(out), torch.from_numpy(lse)


def grouped_logmass_backward(logits, vocab_size, group, n_groups, temperature, out, lse, grad_out):
    x, elem_type = _logits_view(logits)
    dt = _out_dtype(logits)
    grad = _core.grouped_logmass_backward(x, elem_type, int(vocab_size), _np(group, torch.int32), int(n_groups),
                                          float(temperature), _np(out, dt), _np(lse, dt), _np(grad_out, dt),
                                          num_threads())
    return torch.from_numpy(grad)


def range_logmass(logits, vocab_size, order, rows, lo, hi, temperature):
    x, elem_type = _logits_view(logits)
    out, lse = _core.range_logmass(x, elem_type, int(vocab_size), _np(order, torch.int32), _np(rows, torch.int64),
                                   _np(lo, torch.int32), _np(hi, torch.int32), float(temperature), num_threads())
    return torch.from_numpy(out), torch.from_numpy(lse)


def range_logmass_backward(logits, vocab_size, order, rows, lo, hi, temperature, out, lse, grad_out):
    x, elem_type = _logits_view(logits)
    dt = _out_dtype(logits)
    grad = _core.range_logmass_backward(x, elem_type, int(vocab_size), _np(order, torch.int32),
                                        _np(rows, torch.int64), _np(lo, torch.int32), _np(hi, torch.int32),
                                        float(temperature), _np(out, dt), _np(lse, dt), _np(grad_out, dt),
                                        num_threads())
    return torch.from_numpy(grad)


def topk_logprobs(logits, vocab_size, rows, k, temperature):
    """(ids int64 [Q, k], logprobs [Q, k], lse [Q]): the k largest columns of [0, vocab_size) of each
    row in ``rows`` (all rows when None) in decreasing order (ties: smaller id first) and their
    log-probabilities at ``temperature``; rows with NaN, +inf or only -inf come back with lse NaN."""
    x, elem_type = _logits_view(logits)
    ids, out, lse = _core.topk_logprobs(x, elem_type, int(vocab_size), _np(rows, torch.int64), int(k),
                                        float(temperature), num_threads())
    return torch.from_numpy(ids), torch.from_numpy(out), torch.from_numpy(lse)


def topk_logprobs_backward(logits, vocab_size, rows, ids, temperature, lse, grad_out):
    """grad_logits [N, W] of topk_logprobs: (grad_out at the ids - softmax * its row sum) / T per output,
    summed per logits row; 0 in padding columns and in rows no output reads."""
    x, elem_type = _logits_view(logits)
    dt = _out_dtype(logits)
    grad = _core.topk_logprobs_backward(x, elem_type, int(vocab_size), _np(rows, torch.int64), _np(ids, torch.int64),
                                        float(temperature), _np(lse, dt), _np(grad_out, dt), num_threads())
    return torch.from_numpy(grad)


def full_output(rows: int, cols: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] float32/float64 CPU tensor filled with value; large ones reuse the memory of freed
    kernel outputs (a fresh 100+ MB block costs more in page faults than filling it)."""
    arr = _core.empty_output(int(rows), int(cols), "f64" if dtype == torch.float64 else "f32")
    return torch.from_numpy(arr).fill_(value)


def trie_conditional_logprobs(logits, vocab_size, order, trie_nodes, rows, nodes, width, drop_end, temperature):
    """(out [Q, width], lse [N]) of next-symbol log-probabilities below trie nodes, straight from the
    rows (no [Q, children] range tables). trie_nodes: the six int32 node arrays of the trie."""
    x, elem_type = _logits_view(logits)
    out, lse = _core.trie_conditional_logprobs(x, elem_type, int(vocab_size), _np(order, torch.int32), tuple(trie_nodes),
                                               _np(rows, torch.int64), _np(nodes, torch.int64), int(width),
                                               bool(drop_end), float(temperature), num_threads())
    return torch.from_numpy(out), torch.from_numpy(lse)


def trie_conditional_logprobs_backward(logits, vocab_size, order, trie_nodes, rows, nodes, width, drop_end, temperature,
                                       grad_out):
    x, elem_type = _logits_view(logits)
    grad = _core.trie_conditional_logprobs_backward(x, elem_type, int(vocab_size), _np(order, torch.int32),
                                                    tuple(trie_nodes), _np(rows, torch.int64), _np(nodes, torch.int64),
                                                    int(width), bool(drop_end), float(temperature),
                                                    _np(grad_out, _out_dtype(logits)), num_threads())
    return torch.from_numpy(grad)


def _topk_view(indices: torch.Tensor, logprobs: torch.Tensor):
    lp, elem_type = _logits_view(logprobs.contiguous())
    return indices.detach().to(torch.int64).contiguous().numpy(), lp, elem_type


def topk_grouped_logmass(indices, logprobs, vocab_size, group, n_groups, temperature):
    """Sparse rows (indices int64 [N, k], log-probabilities [N, k]) -> out [N, G]; validates the rows
    (ids in range and distinct, no NaN/+inf) and raises ValueError naming the first bad row."""
    idx, lp, elem_type = _topk_view(indices, logprobs)
    out = _core.topk_grouped_logmass(idx, lp, elem_type, int(vocab_size), _np(group, torch.int32), int(n_groups),
                                     float(temperature), num_threads())
    return torch.from_numpy(out)


def topk_grouped_sparse(indices, logprobs, vocab_size, group, n_groups, temperature):
    """Sparse rows -> (ids int64 [N, w], out [N, w]), w = min(k, G): each row's groups in id order, then
    padding ids at -inf (reference.topk_grouped_sparse's layout); validates like topk_grouped_logmass."""
    idx, lp, elem_type = _topk_view(indices, logprobs)
    ids, out = _core.topk_grouped_sparse(idx, lp, elem_type, int(vocab_size), _np(group, torch.int32), int(n_groups),
                                         float(temperature), num_threads())
    return torch.from_numpy(ids), torch.from_numpy(out)


def topk_trie_sparse(indices, logprobs, vocab_size, rank, first_symbol, order, trie_nodes, rows, nodes, width, drop_end,
                     temperature):
    """Sparse rows -> (ids int64 [Q, w], log-probabilities [Q, w]) of trie conditionals, w = min(k, width);
    validates the rows like the other sparse kernels."""
    idx, lp, elem_type = _topk_view(indices, logprobs)
    ids, out = _core.topk_trie_sparse(idx, lp, elem_type, int(vocab_size), _np(rank, torch.int32),
                                      _np(first_symbol, torch.int32), _np(order, torch.int32),
                                      tuple(trie_nodes), _np(rows, torch.int64), _np(nodes, torch.int64), int(width),
                                      bool(drop_end), float(temperature), num_threads())
    return torch.from_numpy(ids), torch.from_numpy(out)


def topk_cover_sparse(indices, logprobs, vocab_size, rank, order_size, ptr, students, n_students, temperature):
    """Sparse rows -> (ids int64 [N, w], log masses [N, w]) of cover_logmass, w = the most students a row reaches."""
    idx, lp, elem_type = _topk_view(indices, logprobs)
    ids, out = _core.topk_cover_sparse(idx, lp, elem_type, int(vocab_size), _np(rank, torch.int32), int(order_size),
                                       _np(ptr, torch.int64), _np(students, torch.int64), int(n_students),
                                       float(temperature), num_threads())
    return torch.from_numpy(ids), torch.from_numpy(out)


def sorted_l1_distance(student: torch.Tensor, teacher: torch.Tensor):
    """(distance float64 [N], sign float32 [N, V_s]) of float32 CPU probability rows (reference.sorted_l1_distance
    and its gradient's sign per student entry), by radix sorts."""
    d, sign = _core.sorted_l1_distance(student.detach().contiguous().numpy(), teacher.detach().contiguous().numpy(),
                                       num_threads())
    return torch.from_numpy(d), torch.from_numpy(sign)


def sorted_l1_logits(student, student_rows, vs, ts, teacher, teacher_rows, vt, tt):
    """sorted_l1_distance of the softmaxes (at ts / tt) of paired rows of two logits tensors [N, W]:
    (distance float64 [P], grad float32 [P, vs]: the distance's gradient in the student row times ts,
    bad uint8 [P]: 1 / 2 where the student / teacher row holds NaN, +inf or only -inf)."""
    xs, s_type = _logits_view(student)
    xt, t_type = _logits_view(teacher)
    d, grad, bad = _core.sorted_l1_logits(xs, s_type, int(vs), _np(student_rows, torch.int64), float(ts), xt, t_type,
                                          int(vt), _np(teacher_rows, torch.int64), float(tt), num_threads())
    return torch.from_numpy(d), torch.from_numpy(grad), torch.from_numpy(bad)
