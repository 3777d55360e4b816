"""CUDA backend of the projection ops: torch tensors in and out around the ``ctalign._cuda`` kernels.

Functions and layouts are those of ``docs/ARCHITECTURE.md`` ("Kernel backends", "Kernel contract").
Logits stay where they are (any CUDA device, float32 / bfloat16 / float16, contiguous last dimension,
any row stride); the kernels run on torch's current stream of that device and nothing here waits for
the GPU. float64 logits are not served here: :mod:`ctalign.ops` keeps them on the pure-torch path
(:mod:`ctalign.reference`); a float64 call raises ``TypeError``.

Kernels (see ``cuda/*.cu`` and ``docs/cuda-notes.md`` for costs and measurements):

- grouped log mass: one pass per row, fused online softmax, shared-memory bins (per-warp copies for
  small G such as the 257 byte groups, shared by the block up to 5120 groups, chunked above);
- range log mass: on GPUs with thread-block clusters (sm_90) each row is permuted once into the
  distributed shared memory of a cluster and every range costs two lookups; elsewhere (or when the
  order does not fit) one warp sums each range directly;
- large G (``project_to_student`` with a big student vocabulary): up to 65,536 groups through the
  range kernel over the group-sorted order when clusters are available, else the chunked bins;
- backward: one dense pass writing the gradient, plus per-range atomics for the range op.

Derived tables (int32 copies, the two most populated groups, the group-sorted order, the cluster
slot table) are cached per table tensor, keyed by identity, data pointer and version: ``ctalign.ops``
passes the same device tensors on every call. Building a cluster plan checks once, with one host
synchronisation, that ``order`` holds distinct ids below ``vocab_size``; every later call is
asynchronous.

:data:`options` selects kernel variants for benchmarks; :data:`last_kernel` names the kernel of the
last call.
"""
from __future__ import annotations

import math
import weakref

import torch

try:
    from ctalign import _cuda
except ImportError:  # built without CUDA: the package works without this module
    _cuda = None

__all__ = [
    "available", "grouped_logmass", "grouped_logmass_backward", "range_logmass", "range_logmass_backward",
    "options", "last_kernel",
]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: Kernel choices (benchmarks and tests): ``grouped_path``: ``auto`` | ``bins`` (shared-memory
#: bins, chunked for large G) | ``cluster`` (the range kernel over the group-sorted order);
#: ``grouped_variant`` (bins only) 0 = automatic, else 10 * rows-per-block + 1 for per-warp bins
#: (11, 21, 41, 20, 40); ``range``: ``auto`` | ``cluster`` | ``direct``;
#: ``cluster_min``: smallest cluster size for the row-resident kernel (0 = fewest blocks that fit).
options = {"grouped_path": "auto", "grouped_variant": 0, "range": "auto", "cluster_min": 0}

#: Name of the kernel that served the last call (``grouped``, ``grouped-chunked``,
#: ``grouped-via-cluster``, ``range-cluster``, ``range-direct``, ...).
last_kernel: str | None = None

# Above this many groups the bins no longer fit beside each other in shared memory (the C++ side
# switches to chunks at the same point: 2 rows x 4 bytes x G > 40 KB).
_SMALL_GROUPS = 40 * 1024 // 8
# Large G: the range kernel over the group-sorted order measured faster at G = 32,001 (9.6 vs
# 12.2 ms) and the chunked bins at G = 128,257 (13.8 vs 17.1 ms), 4096 x 151,936 fp32 on an H100.
_CLUSTER_GROUPS_MAX = 65536


def available() -> bool:
    """True when the CUDA module is built and a CUDA device is usable from torch."""
    if _cuda is None or not torch.cuda.is_available():
        return False
    try:
        return _cuda.device_count() > 0
    except Exception:  # pragma: no cover - a broken driver
        return False


# ---- caches ---------------------------------------------------------------------------------------
_memo: dict = {}


def _stamp(t: torch.Tensor):
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def _memoized(t: torch.Tensor, tag, make):
    """make() cached per (tensor identity, tag); recomputed when the tensor's data changes."""
    key = (id(t), tag)
    hit = _memo.get(key)
    stamp = _stamp(t)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = make()
    if key not in _memo:
        weakref.finalize(t, _memo.pop, key, None)
    _memo[key] = (stamp, value)
    return value


_device_limits: dict[int, tuple[int, int]] = {}


def _cluster_limits(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _device_limits:
        _device_limits[idx] = tuple(_cuda.cluster_limits(idx))
    return _device_limits[idx]


# ---- argument preparation -------------------------------------------------------------------------
def _logits(logits: torch.Tensor, vocab_size) -> tuple[torch.Tensor, int]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch tensor, got {type(logits).__name__}")
    if logits.device.type != "cuda":
        raise ValueError(f"logits: the CUDA backend needs CUDA tensors, got {logits.device}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits: dtype {logits.dtype} is not float32, bfloat16 or float16 "
                        "(float64 runs on ctalign.reference)")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [rows, width], got shape {tuple(logits.shape)}")
    x = logits.detach()
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    v = int(vocab_size)
    if not 0 < v <= x.shape[1]:
        raise ValueError(f"vocab_size {v} does not fit logits of width {x.shape[1]}")
    return x, v


def _temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def _int_table(t: torch.Tensor, device: torch.device, dtype=torch.int32) -> torch.Tensor:
    """A persistent table (group, order) as a contiguous, 16-byte aligned tensor on `device`;
    conversions are cached per source tensor."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.device == device and t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return _memoized(t, ("table", device, dtype), lambda: _aligned_copy(t, device, dtype))


def _order_table(order, device: torch.device) -> torch.Tensor:
    """`order` as a 1-D int32 device table; the same tensor object on every call (caches key on it)."""
    t = _int_table(order, device)
    if t.dim() != 1:
        t = _memoized(t, ("flat",), lambda: t.reshape(-1))
    return t


def _int_arg(t, device: torch.device) -> torch.Tensor:
    """A per-call int32 argument (lo, hi) as a contiguous tensor on `device` (no caching)."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    return t.detach().to(device=device, dtype=torch.int32).contiguous()


def _aligned_copy(t: torch.Tensor, device, dtype) -> torch.Tensor:
    out = t.detach().to(device=device, dtype=dtype).contiguous()
    if out.data_ptr() % 16:
        out = out.clone()
    return out


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _ranges(lo, hi, n_queries: int, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    lo = _int_arg(lo, device)
    hi = _int_arg(hi, device)
    if lo.dim() == 1:
        lo, hi = lo.view(1, -1), hi.view(1, -1)
    if lo.dim() != 2 or lo.shape != hi.shape:
        raise ValueError(f"lo/hi: expected two [Q, C] or [1, C] tensors of one shape, got "
                         f"{tuple(lo.shape)} and {tuple(hi.shape)}")
    if lo.shape[0] not in (1, n_queries):
        raise ValueError(f"lo/hi: {lo.shape[0]} rows of ranges for {n_queries} queries")
    n_ranges = lo.shape[1]
    stride = n_ranges if (lo.shape[0] == n_queries and n_queries > 1) else 0
    return lo, hi, n_ranges, stride


def _rows(rows, n_rows: int, device) -> torch.Tensor | None:
    if rows is None:
        return None
    r = rows.detach() if isinstance(rows, torch.Tensor) else torch.as_tensor(rows)
    return r.to(device=device, dtype=torch.int64).contiguous().view(-1)


# ---- derived tables -------------------------------------------------------------------------------
def _hot_groups(group: torch.Tensor, vocab_size: int, n_groups: int) -> torch.Tensor:
    """int32[2]: the two most populated groups (-1 when fewer exist). No host synchronisation."""
    def make():
        g = group[:vocab_size].long().clamp(0, n_groups)
        counts = torch.zeros(n_groups + 1, dtype=torch.int64, device=group.device)
        counts.scatter_add_(0, g, torch.ones_like(g))
        counts = counts[:n_groups]
        k = min(2, n_groups)
        top = torch.topk(counts, k).indices.to(torch.int32)
        hot = torch.full((4,), -1, dtype=torch.int32, device=group.device)  # 16 bytes
        hot[:k] = top
        return hot
    return _memoized(group, ("hot", vocab_size, n_groups), make)


def _plan(order: torch.Tensor, vocab_size: int, device: torch.device):
    """(slot int32[V], positions per block, cluster size) for the row-resident kernel, or None."""
    max_cluster, smem = _cluster_limits(device)
    n = order.numel()
    if max_cluster == 0 or n == 0:
        return None
    per_block_max = (smem - 16) // 5 // 8 * 8
    cluster = max(1, -(-n // per_block_max), int(options.get("cluster_min") or 0))
    if cluster > max_cluster:
        return None

    def make():
        o = order.long()
        ok = bool(((o >= 0) & (o < vocab_size)).all()) and torch.unique(o).numel() == n  # one sync
        if not ok:
            return None
        per_block = -(-(-(-n // cluster)) // 8) * 8
        pos = torch.arange(n, device=device, dtype=torch.int64)
        slot = torch.full((vocab_size,), -1, dtype=torch.int32, device=device)
        slot[o] = ((pos // per_block) * (1 << 24) + pos % per_block).to(torch.int32)
        return slot, per_block, cluster
    return _memoized(order, ("plan", vocab_size, cluster), make)


def _group_ranges(group: torch.Tensor, vocab_size: int, n_groups: int):
    """Group-sorted order and [1, G] ranges: group g is order[lo[g]:hi[g]]."""
    def make():
        g = group[:vocab_size].long().clamp(0, n_groups)
        order = torch.argsort(g, stable=True)
        counts = torch.zeros(n_groups + 1, dtype=torch.int64, device=group.device).scatter_add_(
            0, g, torch.ones_like(g))[:n_groups]
        hi = torch.cumsum(counts, 0)
        lo = hi - counts
        keep = (g[order] < n_groups)  # out-of-range ids (clamped to G) sort last and are dropped
        order = order[keep] if not bool(keep.all()) else order  # one sync, cached
        return (order.to(torch.int32).contiguous(), lo.to(torch.int32).view(1, -1).contiguous(),
                hi.to(torch.int32).view(1, -1).contiguous())
    return _memoized(group, ("group-ranges", vocab_size, n_groups), make)


# ---- grouped log mass -----------------------------------------------------------------------------
def grouped_logmass(logits, vocab_size, group, n_groups, temperature):
    """(out f32 [N, G], lse f32 [N]): out[r, g] = log sum_{group[t] = g} softmax(x_r / T)_t."""
    global last_kernel
    x, v = _logits(logits, vocab_size)
    t = _temperature(temperature)
    g_count = int(n_groups)
    if g_count < 1:
        raise ValueError(f"n_groups must be positive, got {g_count}")
    dev = x.device
    group = _int_table(group, dev)
    if group.dim() != 1 or group.numel() < v:
        raise ValueError(f"group: expected int32[{v}], got shape {tuple(group.shape)}")
    n = x.shape[0]
    out = torch.empty(n, g_count, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return out, lse
    large = g_count > _SMALL_GROUPS
    choice = options.get("grouped_path", "auto")
    if choice == "cluster" or (choice == "auto" and large and g_count <= _CLUSTER_GROUPS_MAX):
        order, lo, hi = _group_ranges(group, v, g_count)
        plan = _plan(order, v, dev)
        if plan is not None and _cluster_call(x, v, order, lo, hi, 1, 0, None, plan, t, out, lse):
            last_kernel = "grouped-via-cluster"
            return out, lse
    hot = _hot_groups(group, v, g_count)
    variant = int(options.get("grouped_variant") or 0)
    _cuda.grouped_forward(x.data_ptr(), _DTYPES[x.dtype], n, v, x.stride(0), group.data_ptr(), g_count,
                          hot.data_ptr(), t, out.data_ptr(), lse.data_ptr(), _stream(dev), _device_index(dev),
                          variant, 0)
    last_kernel = "grouped-chunked" if large else "grouped-bins"
    return out, lse


def grouped_logmass_backward(logits, vocab_size, group, n_groups, temperature, out, lse, grad_out):
    """grad f32 [N, W] of sum(grad_out * out) with respect to the logits (zero in padding columns)."""
    global last_kernel
    x, v = _logits(logits, vocab_size)
    t = _temperature(temperature)
    dev = x.device
    g_count = int(n_groups)
    group = _int_table(group, dev)
    n, w = x.shape
    out = out.detach().to(dev, torch.float32).contiguous()
    lse = lse.detach().to(dev, torch.float32).contiguous()
    grad_out = grad_out.detach().to(dev, torch.float32).contiguous()
    if out.shape != (n, g_count) or grad_out.shape != (n, g_count) or lse.shape != (n,):
        raise ValueError("grouped_logmass_backward: out/grad_out must be [N, G] and lse [N]")
    grad = torch.empty(n, w, dtype=torch.float32, device=dev)
    if n == 0:
        return grad
    _cuda.grouped_backward(x.data_ptr(), _DTYPES[x.dtype], n, v, x.stride(0), w, group.data_ptr(), g_count, t,
                           out.data_ptr(), lse.data_ptr(), grad_out.data_ptr(), grad.data_ptr(), _stream(dev),
                           _device_index(dev))
    last_kernel = "grouped-backward"
    return grad


# ---- range log mass -------------------------------------------------------------------------------
def _cluster_call(x, v, order, lo, hi, n_queries, range_stride, rows, plan, t, out, lse) -> bool:
    slot, per_block, cluster = plan
    dev = x.device
    n = x.shape[0]
    start = ids = None
    if rows is not None:
        ids = torch.argsort(rows, stable=True)
        start = torch.searchsorted(rows[ids], torch.arange(n + 1, device=dev, dtype=torch.int64))
    return bool(_cuda.range_forward_cluster(
        x.data_ptr(), _DTYPES[x.dtype], n, v, x.stride(0), order.data_ptr(), order.numel(), lo.data_ptr(),
        hi.data_ptr(), lo.shape[1], range_stride, slot.data_ptr(), per_block, cluster,
        0 if start is None else start.data_ptr(), 0 if ids is None else ids.data_ptr(), n_queries, t,
        out.data_ptr(), lse.data_ptr(), _stream(dev), _device_index(dev)))


def range_logmass(logits, vocab_size, order, rows, lo, hi, temperature):
    """(out f32 [Q, C], lse f32 [N]): out[q, c] = log sum_{i in [lo, hi)} softmax(x_{rows q} / T)_{order i}."""
    global last_kernel
    x, v = _logits(logits, vocab_size)
    t = _temperature(temperature)
    dev = x.device
    n = x.shape[0]
    order = _order_table(order, dev)
    rows_t = _rows(rows, n, dev)
    q = n if rows_t is None else rows_t.numel()
    lo, hi, c, stride = _ranges(lo, hi, q, dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return torch.empty(q, c, dtype=torch.float32, device=dev), lse
    choice = options.get("range", "auto")
    if choice in ("auto", "cluster"):
        plan = _plan(order, v, dev)
        if plan is not None:
            # with explicit rows, queries naming no row in [0, N) are never visited: they read -inf
            out = (torch.empty((q, c), dtype=torch.float32, device=dev) if rows_t is None else
                   torch.full((q, c), float("-inf"), dtype=torch.float32, device=dev))
            if _cluster_call(x, v, order, lo, hi, q, stride, rows_t, plan, t, out, lse):
                last_kernel = "range-cluster"
                return out, lse
    out = torch.empty(q, c, dtype=torch.float32, device=dev)
    stats = torch.empty(n, 2, dtype=torch.float32, device=dev)
    _cuda.grouped_forward(x.data_ptr(), _DTYPES[x.dtype], n, v, x.stride(0), 0, 0, 0, t, 0, lse.data_ptr(),
                          _stream(dev), _device_index(dev), 0, stats.data_ptr())
    _cuda.range_forward_direct(x.data_ptr(), _DTYPES[x.dtype], n, v, x.stride(0), order.data_ptr(), order.numel(),
                               0 if rows_t is None else rows_t.data_ptr(), q, lo.data_ptr(), hi.data_ptr(), c,
                               stride, t, stats.data_ptr(), out.data_ptr(), _stream(dev), _device_index(dev))
    last_kernel = "range-direct"
    return out, lse


def range_logmass_backward(logits, vocab_size, order, rows, lo, hi, temperature, out, lse, grad_out):
    """grad f32 [N, W] of sum(grad_out * out) with respect to the logits (zero in padding columns)."""
    global last_kernel
    x, v = _logits(logits, vocab_size)
    t = _temperature(temperature)
    dev = x.device
    n, w = x.shape
    order = _order_table(order, dev)
    rows_t = _rows(rows, n, dev)
    q = n if rows_t is None else rows_t.numel()
    lo, hi, c, stride = _ranges(lo, hi, q, dev)
    out = out.detach().to(dev, torch.float32).contiguous()
    lse = lse.detach().to(dev, torch.float32).contiguous()
    grad_out = grad_out.detach().to(dev, torch.float32).contiguous()
    if out.shape != (q, c) or grad_out.shape != (q, c) or lse.shape != (n,):
        raise ValueError("range_logmass_backward: out/grad_out must be [Q, C] and lse [N]")
    grad = torch.empty(n, w, dtype=torch.float32, device=dev)
    if n == 0:
        return grad
    row_gsum = torch.empty(n, dtype=torch.float32, device=dev)
    _cuda.range_backward_direct(x.data_ptr(), _DTYPES[x.dtype], n, v, x.stride(0), w, order.data_ptr(),
                                order.numel(), 0 if rows_t is None else rows_t.data_ptr(), q, lo.data_ptr(),
                                hi.data_ptr(), c, stride, t, lse.data_ptr(), out.data_ptr(), grad_out.data_ptr(),
                                row_gsum.data_ptr(), grad.data_ptr(), _stream(dev), _device_index(dev))
    last_kernel = "range-backward"
    return grad
