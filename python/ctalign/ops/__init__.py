"""Projection ops: teacher logits to byte and student-vocabulary log-probabilities, with autograd.

    >>> lp = ops.next_byte_logprobs(teacher_logits, teacher_vocab)          # [..., 257]  # doctest: +SKIP
    >>> q = ops.project_to_student(teacher_logits, amap)                    # [..., V_s + 1]  # doctest: +SKIP

Definitions: ``docs/design.md``; kernel contract: ``docs/ARCHITECTURE.md``. Every op takes
logits ``[..., W]`` (``W >= `` the teacher vocabulary; padding columns ignored; float32, bfloat16,
float16 or float64) or sparse rows :class:`TopK`, and returns log-probabilities with one extra last
column, ``end``:

=====================================  ===========  ================================================
op                                     columns      ``end`` column holds
=====================================  ===========  ================================================
:func:`next_byte_logprobs`             257          special tokens (no bytes)
:func:`byte_conditional_logprobs`      257 (256)    tokens whose bytes equal the prefix
:func:`project_to_student`             V_s + 1      teacher specials without a student special of
                                                    their role
:func:`project_to_student_within`      V_s + 1      tokens whose dec_S equals the consumed pieces
:func:`cover_logmass`                  V_s          (no end column: masses of overlapping sets)
=====================================  ===========  ================================================

Conditionals telescope: along a teacher token ``t`` with bytes ``b_1..b_L``,
``next_byte[b_1] + sum_{i=2..L} cond(b_<i)[b_i] + cond(b_1..b_L)[end] = log p(t)`` (summed over the
ids with the same bytes, e.g. SentencePiece's ``▁`` and ``<0x20>``); the same holds for
``project_to_student`` and ``project_to_student_within`` along ``dec_S(t)``.

Dispatch: CPU tensors run the compiled kernels (``ctalign.ops._cpu_backend``), CUDA tensors the CUDA
module when it is built (``ctalign.ops._cuda_backend``; float64 stays on the pure-torch path there), any
other case the pure-torch :mod:`ctalign.reference`. :func:`last_backend` names the backend of the
last call (``cpu``, ``cuda``, ``reference`` or ``topk``). Sparse rows cost O(k log k) per row plus
the output: compiled on CPU (their backward differentiates the pure-torch path), pure torch on any
other device.

Outputs: float32 (float64 for float64 logits), ``-inf`` for zero mass, never NaN; distributions sum
to 1 within 1e-6 in float32. The float32 kernels count tokens below about e^-140 of a row's top token
as zero mass (log-probabilities below about -130 may come out as ``-inf``); sparse rows count kept
probabilities below ~1e-38 as zero. Gradients flow to the logits (the backend's backward; float64
logits run the CPU kernels' float64 path, so ``torch.autograd.gradcheck`` exercises them) or to
``TopK.logprobs``; outputs equal to ``-inf`` carry no gradient. ``-inf`` logits are zero mass everywhere (masked vocabularies, logit processors); a row
holding NaN or +inf, or with no finite entry, is an error. Bad input raises ``TypeError``
(types, dtypes) or ``ValueError`` (shapes, devices, ids out of range, such logits rows, logits
narrower than the map's teacher, ``teacher=``/``student=`` vocabularies a map was not built for)
naming the problem. Finite-logit checking is free on CPU (the kernel reports it); on CUDA it synchronises once
per call unless :data:`check_finite` is set to False.

:func:`topk_logprobs` goes the other way: dense logits rows to :class:`TopK` rows (the k most likely
ids, ties to the smaller id, and their log-probabilities), e.g. to cache a teacher's outputs.

Tables (token groups, sorted orders, trie nodes) are cached as torch tensors on the vocabulary or
map object, per device, so a training loop copies them to the device once.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from ctalign.ops import _cpu_backend, reference
from ctalign.ops._autograd import (_CompiledSparseOutput, _GroupedLogmass, _RangeLogmass, _SortedL1, _TopKGrouped,
                                  _TopKLogprobs, _TrieConditional)
from ctalign.ops._checks import _check_temperature, _compiled_call, _dense_rows, _index_arg, _topk_rows
from ctalign.ops._tables import (_byte_trie, _check_map_vocabs, _map_tables, _Tables, _trie_fields_of,  # noqa: F401
                                 _trie_tables)
from ctalign.ops._types import TopK
from ctalign.errors import NonFiniteLogitsError

__all__ = [
    "TopK", "next_byte_logprobs", "byte_conditional_logprobs", "project_to_student",
    "project_to_student_within", "cover_logmass", "topk_logprobs", "sorted_l1_distance", "last_backend",
    "force_backend", "check_finite",
]

#: Check logits for NaN/inf on CUDA too (one host synchronisation per call); CPU checks are free.
check_finite = True

_last_backend: str | None = None
_forced_backend: str | None = None




def last_backend() -> str | None:
    """Backend that served the last op call: ``cpu``, ``cuda``, ``reference`` or ``topk``."""
    return _last_backend


@contextlib.contextmanager
def force_backend(name: str | None):
    """Route dense calls to one backend (``cpu``, ``cuda`` or ``reference``) inside the block:
    tests compare backends with it, benchmarks time the pure-torch path with it."""
    global _forced_backend
    if name not in (None, "cpu", "cuda", "reference"):
        raise ValueError(f"force_backend: unknown backend {name!r} (cpu, cuda, reference or None)")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


# ---- backends ------------------------------------------------------------------------------------
_cuda_backend_module: Any = None


def _usable_cuda_backend():
    global _cuda_backend_module
    if _cuda_backend_module is None:
        try:
            from ctalign.ops import _cuda_backend as mod
            _cuda_backend_module = mod if mod.available() else False
        except Exception:  # not built, or no usable device: the reference serves CUDA tensors
            _cuda_backend_module = False
    return _cuda_backend_module or None


def _backend_for(x: torch.Tensor):
    name = _forced_backend
    if name is None:
        if x.device.type == "cpu" and _cpu_backend.available():
            name = "cpu"
        elif x.device.type == "cuda" and x.dtype != torch.float64 and _usable_cuda_backend() is not None:
            name = "cuda"
        else:
            name = "reference"
    if name == "cpu":
        if not _cpu_backend.available():
            raise ValueError("the CPU kernels (ctalign._core) are not available")
        return _cpu_backend, name
    if name == "cuda":
        mod = _usable_cuda_backend()
        if mod is None:
            raise ValueError("the CUDA kernels (ctalign._cuda) are not available")
        return mod, name
    return reference, "reference"


def _compiled_topk(idx: torch.Tensor) -> bool:
    return idx.device.type == "cpu" and _forced_backend in (None, "cpu") and _cpu_backend.available()

# ---- argument checks -----------------------------------------------------------------------------
def _raise_nonfinite(op: str, bad_rows: torch.Tensor) -> None:
    if bool(bad_rows.any()):
        r = int(bad_rows.nonzero()[0])
        raise NonFiniteLogitsError(f"{op}: logits row {r} holds NaN or infinite values: NaN, +inf or no finite "
                                   f"entry (or overflows at this temperature); -inf entries alone are fine", r)


def _check_rows_finite(op: str, x: torch.Tensor, n_tokens: int, lse: torch.Tensor | None,
                       rows: torch.Tensor | None, backend_name: str) -> None:
    if backend_name == "cuda" and not check_finite:
        return
    if lse is not None and backend_name != "reference":
        bad = ~torch.isfinite(lse if rows is None else lse[rows])
        if rows is not None and bool(bad.any()):
            bad = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device).index_fill(0, rows[bad], True)
        _raise_nonfinite(op, bad)
        return
    used = x[:, :n_tokens]
    # NaN, +inf, or no finite entry; -inf entries are zero mass (masked tokens)
    bad = torch.isnan(used).any(dim=-1) | ~torch.isfinite(used.amax(dim=-1)) if used.shape[-1] else \
        torch.ones(used.shape[0], dtype=torch.bool, device=used.device)
    if rows is not None:
        keep = torch.zeros_like(bad).index_fill(0, rows, True)
        bad = bad & keep
    _raise_nonfinite(op, bad)


# ---- generic grouped / range calls ---------------------------------------------------------------
def _grouped(op: str, logits, n_tokens: int, what: str, tables: _Tables, n_groups: int, temperature) -> torch.Tensor:
    global _last_backend
    t = _check_temperature(op, temperature)
    if isinstance(logits, TopK):
        compiled = _compiled_topk(logits.indices) if isinstance(logits.indices, torch.Tensor) else False
        idx, lp, lead = _topk_rows(op, logits, n_tokens, what, deep=not compiled)
        group = tables.on(idx.device)["group"]
        if compiled:
            out = _compiled_call(op, _TopKGrouped.apply, lp, idx, n_tokens, group, n_groups, t)
        else:
            out = reference.topk_grouped_logmass(idx, lp, group, n_groups, t)
        _last_backend = "topk"
        return out.reshape(*lead, n_groups)
    x, lead = _dense_rows(op, logits, n_tokens, what)
    backend, name = _backend_for(x)
    group = tables.on(x.device)["group"]
    if backend is reference:
        _check_rows_finite(op, x, n_tokens, None, None, name)
        out, _ = reference.grouped_logmass(x, n_tokens, group, n_groups, t)
    else:
        out, lse = _GroupedLogmass.apply(x, backend, n_tokens, group, n_groups, t)
        _check_rows_finite(op, x, n_tokens, lse, None, name)
    _last_backend = name
    return out.reshape(*lead, n_groups)


def _ranges(op: str, logits, n_tokens: int, what: str, trie: _Tables, rows, lo, hi, temperature):
    """out [Q, C] (rows None: one query per row, Q = N) of range log masses over trie.order, from dense
    rows (sparse rows take _topk_trie_conditional / _topk_cover)."""
    global _last_backend
    t = _check_temperature(op, temperature)
    x, _ = _dense_rows(op, logits, n_tokens, what)
    backend, name = _backend_for(x)
    order = trie.on(x.device)["order"]
    lo, hi = lo.to(x.device, torch.int32).contiguous(), hi.to(x.device, torch.int32).contiguous()
    if backend is reference:
        _check_rows_finite(op, x, n_tokens, None, rows, name)
        out, _ = reference.range_logmass(x, n_tokens, order, rows, lo, hi, t)
    else:
        out, lse = _RangeLogmass.apply(x, backend, n_tokens, order, rows, lo, hi, t)
        _check_rows_finite(op, x, n_tokens, lse, rows, name)
    _last_backend = name
    return out


def _n_rows(op: str, logits, n_tokens: int, what: str) -> tuple[int, torch.device]:
    if isinstance(logits, TopK):
        idx = logits.indices
        if not isinstance(idx, torch.Tensor) or idx.dim() < 1:
            raise TypeError(f"{op}: TopK.indices must be a torch tensor [..., k]")
        return int(np.prod(idx.shape[:-1])), idx.device
    x, _ = _dense_rows(op, logits, n_tokens, what)
    return x.shape[0], x.device


# ---- sparse rows without range tables ------------------------------------------------------------
def _child_keys(host: dict[str, torch.Tensor]) -> torch.Tensor:
    """parent * (M + 1) + lo of every child in child_node order: sorted, since children are listed by
    parent and, within a parent, in order position; searchsorted finds the child holding a position."""
    start, child = host["child_start"], host["child_node"]
    parent = torch.repeat_interleave(torch.arange(len(start) - 1), start[1:] - start[:-1])
    return parent * (int(host["order"].numel()) + 1) + host["node_lo"][child]


def _cover_lists(host: dict[str, torch.Tensor], m: int) -> torch.Tensor:
    """(ptr [M + 1], students [E]) packed as one int64 tensor: the student tokens whose cover range
    holds each teacher-trie position (those whose bytes prefix the token there), by position."""
    lo, hi = host["cover_lo"].reshape(-1).long(), host["cover_hi"].reshape(-1).long()
    count = (hi - lo).clamp(min=0)
    student = torch.repeat_interleave(torch.arange(len(lo)), count)
    first = torch.cumsum(count, 0) - count
    pos = lo[student] + torch.arange(len(student)) - first[student]
    pos, perm = torch.sort(pos, stable=True)
    ptr = torch.zeros(m + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(pos, minlength=m), 0)
    return torch.cat([ptr, student[perm]])


def _scatter_log_masses(out: torch.Tensor, key: torch.Tensor, mass: torch.Tensor,
                        den: torch.Tensor | None = None) -> torch.Tensor:
    """Writes ``out.view(-1)[k] = log(sum of mass over entries with key k)`` in place (out: filled with
    -inf), minus ``log den[k // width]`` when ``den`` is given (rows whose den is 0 have no mass)."""
    if key.numel() == 0:
        return out
    ukey, inv = torch.unique(key, return_inverse=True)
    sums = torch.zeros(len(ukey), dtype=mass.dtype, device=mass.device).index_add(0, inv, mass)
    vals = reference.safe_log(sums)
    if den is not None:  # outputs without mass stay -inf constants (no gradient through den)
        vals = torch.where(sums > 0, vals - _log_or_zero(den)[ukey // out.shape[1]], vals)
    return out.view(-1).index_put_((ukey,), vals.to(out.dtype)).view(out.shape)


def _full_output(shape: tuple[int, int], value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu" and _cpu_backend.available():
        return _cpu_backend.full_output(shape[0], shape[1], value, dtype)
    return torch.full(shape, value, dtype=dtype, device=device)


def _log_or_zero(mass: torch.Tensor) -> torch.Tensor:
    """log(mass) where mass > 0, else 0 (a denominator whose numerators are all zero)."""
    return torch.where(mass > 0, reference.safe_log(mass), torch.zeros_like(mass))


def _pack_sparse(key: torch.Tensor, mass: torch.Tensor, den: torch.Tensor | None, n_rows: int, n_cols: int,
                 width: int | None, out_dtype: torch.dtype) -> "TopK":
    """Sparse output rows from (row * n_cols + col, mass) entries: per row, its distinct columns in
    increasing order with ``log(summed mass) - log den[row]``, then padding ids (the smallest columns
    the row does not use, so ids stay distinct) at -inf. width: fixed, or None for the most columns any
    row uses."""
    device = mass.device
    ukey, inv = torch.unique(key, return_inverse=True)
    row, col = ukey // n_cols, ukey % n_cols
    n_used = torch.bincount(row, minlength=n_rows)
    if width is None:
        width = int(n_used.max()) if n_rows else 0
    ids = torch.zeros(n_rows, width + 1, dtype=torch.int64, device=device)
    vals = torch.full((n_rows, width + 1), float("-inf"), dtype=out_dtype, device=device)
    if width == 0:
        return TopK(ids[:, :0], vals[:, :0])
    if ukey.numel():
        sums = torch.zeros(len(ukey), dtype=mass.dtype, device=device).index_add(0, inv, mass)
        logm = reference.safe_log(sums)
        if den is not None:  # outputs without mass stay -inf constants (no gradient through den)
            logm = torch.where(sums > 0, logm - _log_or_zero(den)[row], logm)
        pos = torch.arange(len(ukey), device=device) - torch.searchsorted(row, torch.arange(n_rows, device=device))[row]
        ids = ids.index_put((row, pos), col)
        vals = vals.index_put((row, pos), logm.to(out_dtype))
    used = torch.arange(width, device=device) < n_used[:, None]
    taken = torch.where(used, ids[:, :width], torch.full_like(ids[:, :width], n_cols))  # ascending per row
    candidates = torch.arange(min(2 * width, n_cols), device=device).expand(n_rows, -1).contiguous()
    free = taken.gather(1, torch.searchsorted(taken, candidates).clamp(max=width - 1)) != candidates
    rank = torch.cumsum(free, dim=-1) - 1
    slot = torch.where(free & (rank < width - n_used[:, None]), n_used[:, None] + rank, torch.full_like(rank, width))
    ids = ids.scatter(1, slot, candidates)
    return TopK(ids[:, :width], vals[:, :width])


def _topk_trie_conditional(op: str, topk: "TopK", n_tokens: int, what: str, trie: _Tables, rows: torch.Tensor,
                           nodes: torch.Tensor, width: int, drop_end: bool, temperature: float,
                           sparse: bool = False, compiled: bool = True):
    """Trie conditionals from top-k rows in torch ops (any device, autograd through them): each kept
    entry finds the child of the query's node that holds it (searchsorted over the child keys), so a
    query costs O(k log children + width), however many children its node has."""
    if sparse and compiled and isinstance(topk.indices, torch.Tensor) and _compiled_topk(topk.indices):
        idx, lp, _ = _topk_rows(op, topk, n_tokens, what, deep=False)  # the kernel validates the rows
        tab = trie.on(idx.device)
        rank32 = trie.derived("rank32", idx.device, lambda host: host["rank"].to(torch.int32))

        def torch_path(t):
            return _topk_trie_conditional(op, t, n_tokens, what, trie, rows, nodes, width, drop_end, temperature,
                                          sparse=True, compiled=False)

        args = (n_tokens, rank32, tab["group"], tab["order"], trie.nodes_np, rows, nodes, width, drop_end, temperature)
        ids, out = _compiled_call(op, _CompiledSparseOutput.apply, lp, idx, _cpu_backend.topk_trie_sparse, torch_path,
                                  args)
        return TopK(ids, out)
    idx, lp, _ = _topk_rows(op, topk, n_tokens, what, deep=True)
    p, out_dtype = reference._topk_probs(lp, temperature)
    device, m = p.device, trie.n_members
    tab = trie.on(device)
    keys = trie.derived("child_key", device, _child_keys)
    if keys.numel() == 0:  # a trie without children: every entry is in some node's end range
        keys = torch.full((1,), -1, dtype=torch.int64, device=device)
    rows, nodes = rows.to(device), nodes.to(device)
    r = tab["rank"][idx][rows]  # [Q, k] order positions of each query row's entries, -1 outside
    pq = p[rows]
    lo, end, hi = (tab[f][nodes][:, None] for f in ("node_lo", "node_end", "node_hi"))
    in_node = (r >= lo) & (r < hi)
    in_end = in_node & (r < end)
    in_kids = in_node & ~in_end
    den = (pq * (in_kids if drop_end else in_node)).sum(-1)
    n_q = len(rows)
    out = None if sparse else _full_output((n_q, width), float("-inf"), out_dtype, device)
    slot = (torch.searchsorted(keys, nodes[:, None] * (m + 1) + r, right=True) - 1).clamp(min=0)
    col = tab["node_symbol"][tab["child_node"][slot]]
    col = torch.where(in_end, torch.full_like(col, width - 1), col)  # the end column (not with drop_end)
    kept = in_kids if drop_end else in_node
    q_of = torch.arange(n_q, device=device)[:, None].expand_as(r)
    if sparse:
        return _pack_sparse((q_of * width + col)[kept], pq[kept], den, n_q, width, min(r.shape[1], width), out_dtype)
    return _scatter_log_masses(out, (q_of * width + col)[kept], pq[kept], den)


def _topk_cover(op: str, topk: "TopK", maps: _Tables, byte_trie: _Tables, temperature: float,
                sparse: bool = False, compiled: bool = True):
    """cover_logmass from top-k rows in torch ops: each kept entry adds its probability to the student
    tokens that prefix it (a per-position list built once per map), so a row costs O(k L + V_s) for
    tokens of L bytes instead of a range query per student token."""
    m = byte_trie.n_members
    what = "the map's teacher vocabulary"
    if sparse and compiled and isinstance(topk.indices, torch.Tensor) and _compiled_topk(topk.indices):
        idx, lp, _ = _topk_rows(op, topk, maps.n_teacher, what, deep=False)  # the kernel validates the rows
        lists = maps.derived("cover_lists", idx.device, lambda host: _cover_lists(host, m))
        rank32 = byte_trie.derived("rank32", idx.device, lambda host: host["rank"].to(torch.int32))

        def torch_path(t):
            return _topk_cover(op, t, maps, byte_trie, temperature, sparse=True, compiled=False)

        args = (maps.n_teacher, rank32, m, lists[:m + 1], lists[m + 1:], maps.n_student, temperature)
        ids, out = _compiled_call(op, _CompiledSparseOutput.apply, lp, idx, _cpu_backend.topk_cover_sparse, torch_path,
                                  args)
        return TopK(ids, out)
    idx, lp, _ = _topk_rows(op, topk, maps.n_teacher, what, deep=True)
    p, out_dtype = reference._topk_probs(lp, temperature)
    device = p.device
    lists = maps.derived("cover_lists", device, lambda host: _cover_lists(host, m))
    ptr, students = lists[:m + 1], lists[m + 1:]
    r = byte_trie.on(device)["rank"][idx]  # [N, k], -1 outside the trie order
    inside = r >= 0
    rr = torch.where(inside, r, torch.zeros_like(r))
    count = torch.where(inside, ptr[rr + 1] - ptr[rr], torch.zeros_like(r)).reshape(-1)
    entry = torch.repeat_interleave(torch.arange(count.numel(), device=device), count)
    first = torch.cumsum(count, 0) - count
    s = students[ptr[rr.reshape(-1)][entry] + torch.arange(entry.numel(), device=device) - first[entry]]
    row = entry // idx.shape[1]
    n_s = maps.n_student
    if sparse:
        return _pack_sparse(row * n_s + s, p.reshape(-1)[entry], None, idx.shape[0], n_s, None, out_dtype)
    out = _full_output((idx.shape[0], n_s), float("-inf"), out_dtype, device)
    return _scatter_log_masses(out, row * n_s + s, p.reshape(-1)[entry])


def _child_ranges(trie: _Tables, nodes: torch.Tensor, scratch_column: int, compiled: bool = True):
    """Compact child ranges of trie nodes: (lo, hi int32 [Q, K + 3], symbol int64 [Q, K], K).

    Columns 0..K-1: the node's children in symbol order (K = most children among `nodes`; missing
    ones are empty ranges with symbol `scratch_column`); K: end [node_lo, node_end); K + 1: the node
    [node_lo, node_hi); K + 2: continuing [node_end, node_hi). Compiled for CPU node ids, torch ops
    (on the nodes' device) otherwise."""
    if compiled and nodes.device.type == "cpu" and hasattr(_cpu_backend._core, "compact_child_ranges"):
        lo, hi, symbol = _cpu_backend._core.compact_child_ranges(*trie.nodes_np, nodes.numpy(), scratch_column)
        return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(symbol), symbol.shape[1]
    tab = trie.on(nodes.device)
    start = tab["child_start"][nodes]
    count = tab["child_start"][nodes + 1] - start
    k = int(count.max()) if nodes.numel() else 0
    j = torch.arange(k, device=nodes.device)
    valid = j[None, :] < count[:, None]
    n_child = tab["child_node"].numel()
    child = tab["child_node"][(start[:, None] + j[None, :]).clamp(max=max(n_child - 1, 0))] if k else \
        torch.zeros(len(nodes), 0, dtype=torch.int64, device=nodes.device)
    zero = torch.zeros_like(child)
    kid_lo = torch.where(valid, tab["node_lo"][child], zero) if k else zero
    kid_hi = torch.where(valid, tab["node_hi"][child], zero) if k else zero
    symbol = torch.where(valid, tab["node_symbol"][child], torch.full_like(child, scratch_column)) if k else zero
    n_lo, n_hi, n_end = tab["node_lo"][nodes, None], tab["node_hi"][nodes, None], tab["node_end"][nodes, None]
    lo = torch.cat([kid_lo, n_lo, n_lo, n_end], dim=1).to(torch.int32)
    hi = torch.cat([kid_hi, n_end, n_hi, n_hi], dim=1).to(torch.int32)
    return lo, hi, symbol, k


def _log_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num - den in log space, -inf where either has no mass (never NaN); like the kernels' backward,
    a -inf result carries no gradient (not even through the denominator)."""
    ok = (den > float("-inf")) & (num > float("-inf"))
    zero = torch.zeros((), dtype=num.dtype, device=num.device)
    return torch.where(ok, torch.where(ok, num, zero) - torch.where(ok, den, zero), torch.full_like(num, float("-inf")))


def _conditional(op: str, logits, n_tokens: int, what: str, trie: _Tables, rows, nodes, node_name: str,
                 temperature, drop_end: bool, sparse: bool = False):
    global _last_backend
    if sparse and not isinstance(logits, TopK):
        raise TypeError(f"{op}: sparse=True needs TopK teacher rows, got {type(logits).__name__}")
    n_rows, device = _n_rows(op, logits, n_tokens, what)
    rows_t = _index_arg(op, "rows", rows, n_rows, device, "logits rows")
    nodes_t = _index_arg(op, node_name, nodes, trie.n_nodes, device, f"trie nodes, {trie.n_nodes} of them")
    if rows_t.shape != nodes_t.shape:
        raise ValueError(f"{op}: rows has {rows_t.numel()} entries but {node_name} has {nodes_t.numel()}")
    n_sym = trie.n_symbols
    width = n_sym if drop_end else n_sym + 1
    if not isinstance(logits, TopK):
        x, _ = _dense_rows(op, logits, n_tokens, what)
        backend, name = _backend_for(x)
        if backend is _cpu_backend:
            out, lse = _TrieConditional.apply(x, n_tokens, trie.on(x.device)["order"], trie.nodes_np, rows_t, nodes_t,
                                              width, drop_end, _check_temperature(op, temperature))
            _check_rows_finite(op, x, n_tokens, lse, rows_t, name)
            _last_backend = name
            return out
    else:
        out = _topk_trie_conditional(op, logits, n_tokens, what, trie, rows_t, nodes_t, width, drop_end,
                                     _check_temperature(op, temperature), sparse)
        _last_backend = "topk"
        return out
    lo, hi, symbol, k = _child_ranges(trie, nodes_t, width)
    vals = _ranges(op, logits, n_tokens, what, trie, rows_t, lo, hi, temperature)
    kids, end, own, cont = vals[:, :k], vals[:, k:k + 1], vals[:, k + 1:k + 2], vals[:, k + 2:k + 3]
    q = vals.shape[0]
    if drop_end:
        index, src = symbol, _log_ratio(kids, cont)
    else:
        index = torch.cat([symbol, torch.full((q, 1), n_sym, dtype=torch.int64, device=vals.device)], dim=1)
        src = torch.cat([_log_ratio(kids, own), _log_ratio(end, own)], dim=1)
    out = torch.full((q, width + 1), float("-inf"), dtype=vals.dtype, device=vals.device)
    return out.scatter(1, index.to(vals.device), src)[:, :width]


# ---- public ops ----------------------------------------------------------------------------------
def topk_logprobs(logits, k: int, *, rows=None, vocab_size: int | None = None, temperature: float = 1.0) -> TopK:
    """The ``k`` most likely tokens of each row and their log-probabilities, as ``TopK`` rows
    ``[..., k]`` (the sparse format every op accepts; e.g. to cache a teacher's outputs), in
    decreasing order, ties broken by the smaller id: ``logprobs = log_softmax(logits / T)`` at
    ``indices``, over the first ``vocab_size`` columns (default: all; padding columns are ignored).

    ``rows``: optional 1-d ids of rows of the logits flattened to ``[N, W]`` (as the other ops
    flatten them: a view, or a copy when the logits cannot be viewed so): the result is then
    ``[len(rows), k]`` and the kernel reads no other row (e.g. the target positions of a batch).

    On CPU one compiled pass per row (softmax fused, no ``[N, V]`` intermediate), with a compiled
    backward that is once-differentiable like the other ops' (``force_backend("reference")`` for
    higher-order gradients); elsewhere pure torch. ``-inf`` logits are allowed (zero mass); NaN,
    ``+inf``, a row of only ``-inf``, a row that overflows at the temperature
    (:class:`~ctalign.errors.NonFiniteLogitsError`, a ``ValueError`` with the row) or a width below
    ``vocab_size`` raise."""
    global _last_backend
    op = "topk_logprobs"
    t = _check_temperature(op, temperature)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must have a last (vocabulary) dimension, got a scalar")
    if vocab_size is None:
        n_tokens = int(logits.shape[-1])
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"{op}: vocab_size must be a positive int or None, got {vocab_size!r}")
    else:
        n_tokens = int(vocab_size)
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point() and k.dtype != torch.bool:
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_tokens:
        raise ValueError(f"{op}: k = {k} is outside [1, {n_tokens}] (the vocabulary size)")
    k = int(k)
    x, lead = _dense_rows(op, logits, n_tokens, "vocab_size")
    if rows is not None:
        rows = _index_arg(op, "rows", rows, x.shape[0], x.device, "rows of the flattened logits")
        lead = (rows.shape[0],)
    n_out = x.shape[0] if rows is None else rows.shape[0]
    if n_out == 0:  # still connected to the logits, so a loss over it can call backward
        lp = x[:0, :k].to(reference._compute_dtype(x.dtype))
        return TopK(torch.empty(0, k, dtype=torch.int64, device=x.device).reshape(*lead, k), lp.reshape(*lead, k))
    _, name = _backend_for(x)
    if name == "cpu":
        ids, lp, lse = _TopKLogprobs.apply(x, n_tokens, rows, k, t)
    else:
        if rows is not None:
            x = x.index_select(0, rows)
        used = x[:, :n_tokens]
        _raise_topk_nonfinite(op, torch.isnan(used).any(-1) | (used == float("inf")).any(-1), rows)
        ids, lp, lse = reference.topk_logprobs(x, n_tokens, None, k, t)
        name = "reference"
    _raise_topk_nonfinite(op, ~torch.isfinite(lse), rows)
    _last_backend = name
    return TopK(ids.reshape(*lead, k), lp.reshape(*lead, k))


def _raise_topk_nonfinite(op: str, bad_outputs: torch.Tensor, rows: torch.Tensor | None) -> None:
    if bool(bad_outputs.any()):
        i = int(bad_outputs.nonzero()[0])
        r = i if rows is None else int(rows[i])
        raise NonFiniteLogitsError(f"{op}: logits row {r} holds NaN or +inf, only -inf, or overflows at this "
                                   f"temperature", r)


def uses_compiled_kernels(x: torch.Tensor) -> bool:
    """True when a dense op on ``x`` runs the compiled CPU kernels (CPU tensor, ``_core`` built, no
    other backend forced)."""
    return isinstance(x, torch.Tensor) and _backend_for(x)[1] == "cpu"


def next_byte_logprobs(logits, vocab, *, temperature: float = 1.0) -> torch.Tensor:
    """Next byte at a teacher token boundary: ``[..., 257]``, column b < 256 the log mass of the
    tokens whose bytes start with b, column 256 (``end``) the special tokens'.

    ``vocab``: the teacher :class:`~ctalign.vocab.Vocab` (its byte trie), an AlignmentMap (its
    teacher side) or a byte ``SequenceTrie``. ``logits``: ``[..., W >= len(vocab)]`` or a TopK."""
    op = "next_byte_logprobs"
    trie = _byte_trie(vocab)
    return _grouped(op, logits, trie.n_tokens, "the vocabulary", trie, 257, temperature)


def byte_conditional_logprobs(logits, vocab, rows, prefixes, *, temperature: float = 1.0,
                              drop_end: bool = False) -> torch.Tensor:
    """Next byte inside a teacher token, one row per query: ``[Q, 257]``.

    Query q reads logits row ``rows[q]`` (of the logits flattened to ``[N, W]``) and the byte prefix
    ``prefixes[q]`` (a node id of the teacher byte trie, e.g. ``vocab.trie.lookup(b"hel")``):
    ``out[q, b] = log mass(prefix + b) - log mass(prefix)``, ``out[q, 256] = log ended(prefix) -
    log mass(prefix)`` (``end``: tokens whose bytes equal the prefix). At the root (node 0) this is
    the next byte given that the token has bytes (specials excluded; :func:`next_byte_logprobs`
    keeps them in ``end``). A prefix with zero mass gives a row of ``-inf``.

    ``drop_end=True`` gives BLD's byte targets: ``[Q, 256]``, renormalised over the tokens that
    continue past the prefix (``log mass(prefix + b) - log (mass(prefix) - ended(prefix))``); it drops
    the tokens that end exactly at the prefix, whose continuation needs the next teacher step."""
    op = "byte_conditional_logprobs"
    trie = _byte_trie(vocab)
    return _conditional(op, logits, trie.n_tokens, "the vocabulary", trie, rows, prefixes, "prefixes",
                        temperature, bool(drop_end))


def project_to_student(logits, amap, *, temperature: float = 1.0, teacher=None, student=None,
                       sparse: bool = False):
    """Next student token at a teacher boundary: ``[..., V_s + 1]``, ``q(s) = sum_{dec_S(t)[0] = s} p(t)``;
    teacher specials go to the student special of their role, else to the last column (``end``).

    ``sparse=True`` (``TopK`` rows only): the result is a ``TopK`` of student ids in ``[0, V_s]``
    (``V_s`` is ``end``) and their log-probabilities, ``[..., min(k, V_s + 1)]``, so a row costs
    O(k log k) instead of a ``V_s + 1`` wide row: the u student tokens a row's k teacher tokens land
    on, in increasing id order, then padding ids (distinct, unused) at ``-inf``. Scattered into ``[..., V_s + 1]`` it equals
    the dense result. ``teacher`` / ``student``: optional vocabularies to check the map against
    (fingerprints)."""
    global _last_backend
    op = "project_to_student"
    maps, _, _ = _map_tables(amap)
    _check_map_vocabs(op, amap, teacher, student)
    if sparse:
        if not isinstance(logits, TopK):
            raise TypeError(f"{op}: sparse=True needs TopK teacher rows, got {type(logits).__name__}")
        t = _check_temperature(op, temperature)
        compiled = _compiled_topk(logits.indices) if isinstance(logits.indices, torch.Tensor) else False
        what = "the map's teacher vocabulary"
        idx, lp, lead = _topk_rows(op, logits, maps.n_teacher, what, deep=not compiled)
        group, n_groups = maps.on(idx.device)["group"], maps.n_student + 1
        if compiled:
            def torch_path(rows: TopK) -> TopK:  # the same ids in the same order: the backward differentiates it
                return TopK(*reference.topk_grouped_sparse(rows.indices, rows.logprobs, group, n_groups, t))

            ids, logmass = _compiled_call(op, _CompiledSparseOutput.apply, lp, idx, _cpu_backend.topk_grouped_sparse,
                                          torch_path, (maps.n_teacher, group, n_groups, t))
        else:
            ids, logmass = reference.topk_grouped_sparse(idx, lp, group, n_groups, t)
        _last_backend = "topk"
        return TopK(ids.reshape(*lead, ids.shape[-1]), logmass.reshape(*lead, ids.shape[-1]))
    return _grouped(op, logits, maps.n_teacher, "the map's teacher vocabulary", maps, maps.n_student + 1,
                    temperature)


def project_to_student_within(logits, amap, rows, consumed, *, temperature: float = 1.0, teacher=None,
                              student=None, sparse: bool = False):
    """Next student piece inside a teacher token: ``[Q, V_s + 1]``. Query q reads logits row
    ``rows[q]`` and ``consumed[q]``, a node of the map's dec trie (the student pieces already
    consumed inside the teacher token): ``out[q, s] = log mass_dec(consumed + s) - log
    mass_dec(consumed)``, ``out[q, V_s]`` the tokens whose dec_S equals ``consumed`` (``end``).

    ``sparse=True`` (``TopK`` rows only): a ``TopK`` of columns in ``[0, V_s]`` and their
    log-probabilities, ``[Q, min(k, V_s + 1)]``: the columns the row's kept entries reach, in
    increasing order, then unused padding columns at ``-inf``; scattered into ``[Q, V_s + 1]`` it
    equals the dense result, at O(k log k) per query instead of a ``V_s + 1`` wide row."""
    op = "project_to_student_within"
    maps, _, dec = _map_tables(amap)
    _check_map_vocabs(op, amap, teacher, student)
    return _conditional(op, logits, maps.n_teacher, "the map's teacher vocabulary", dec, rows, consumed,
                        "consumed", temperature, False, bool(sparse))


def cover_logmass(logits, amap, *, temperature: float = 1.0, teacher=None, student=None, sparse: bool = False):
    """``[..., V_s]``: log mass of the teacher tokens whose bytes start with each student token's bytes
    (``-inf`` for student specials and student tokens that prefix no teacher token).

    ``sparse=True`` (``TopK`` rows only): a ``TopK`` of student ids and log masses, ``[..., w]`` with
    w the most student tokens any row reaches (each kept teacher token reaches the student tokens
    that prefix its bytes): a row's ids in increasing order, then unused padding ids at ``-inf``."""
    op = "cover_logmass"
    maps, byte_trie, _ = _map_tables(amap)
    _check_map_vocabs(op, amap, teacher, student)
    if isinstance(logits, TopK):
        global _last_backend
        t = _check_temperature(op, temperature)
        out = _topk_cover(op, logits, maps, byte_trie, t, bool(sparse))
        _last_backend = "topk"
        lead = tuple(logits.indices.shape[:-1])
        if sparse:
            w = out.indices.shape[-1]
            return TopK(out.indices.reshape(*lead, w), out.logprobs.reshape(*lead, w))
        return out.reshape(*lead, maps.n_student)
    if sparse:
        raise TypeError(f"{op}: sparse=True needs TopK teacher rows, got {type(logits).__name__}")
    _, lead = _dense_rows(op, logits, maps.n_teacher, "the map's teacher vocabulary")
    device = logits.device
    tab = maps.on(device)
    out = _ranges(op, logits, maps.n_teacher, "the map's teacher vocabulary", byte_trie, None,
                  tab["cover_lo"], tab["cover_hi"], temperature)
    return out.reshape(*lead, maps.n_student)


def sorted_l1_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD's exact distance, one value per row: ``sum_i |s_(i) - t_(i)|`` between the student's
    ``[N, V_s]`` and the teacher's ``[N, V_t]`` probabilities, each sorted in decreasing order, the
    shorter padded with zeros; differentiable in ``student_probs`` (the teacher's are taken as constants).

    On CPU (float32) by compiled radix sorts of the float bits (O(V) per row, one thread per row, about
    an order of magnitude faster than ``torch.sort``); elsewhere, or under ``force_backend('reference')``,
    ``reference.sorted_l1_distance``. Probabilities must be finite and non-negative."""
    global _last_backend
    if student_probs.dim() != 2 or teacher_probs.dim() != 2 or student_probs.shape[0] != teacher_probs.shape[0]:
        raise ValueError(f"sorted_l1_distance: expected [N, V_s] and [N, V_t] rows, got {tuple(student_probs.shape)} "
                         f"and {tuple(teacher_probs.shape)}")
    compiled = (student_probs.device.type == "cpu" and teacher_probs.device.type == "cpu"
                and student_probs.dtype == torch.float32 and _forced_backend in (None, "cpu")
                and _cpu_backend.available() and student_probs.shape[0] > 0)
    if not compiled:
        _last_backend = "reference"
        return reference.sorted_l1_distance(student_probs, teacher_probs.detach())
    _last_backend = "cpu"
    return _SortedL1.apply(student_probs, teacher_probs.detach().float())
