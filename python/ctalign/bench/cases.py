"""One benchmark case (op, pair, dtype, rows, device) and its callables: the op, its reference, and the
baselines (roofline, I/O bound, torch formulations, the dense mapping matrix, softmax).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ctalign.bench.config import (GiB, _BYTE_OPS, _TOPK_OPS, _DTYPES, _SEED)
from ctalign.bench.workspace import (_padded, _as_numpy, Workspace, _first_byte, _trie_order, _map_array,
                                     _student_size)


@dataclass
class Case:
    section: str                 # ops | rows | vocab | k | threads | gpu-rows ...
    op: str
    teacher: str
    student: str | None
    dtype: str = "fp32"
    rows: int = 256
    k: int | None = None
    device: str = "cpu"
    threads: int | None = None
    baselines: tuple[str, ...] = ("roofline", "torch", "dense", "softmax")
    note: str = ""

    @property
    def pair(self) -> str:
        return self.teacher if self.student is None or self.op in _BYTE_OPS else f"{self.teacher}:{self.student}"


@dataclass
class Prepared:
    run: Callable[[], Any]                           # the ctalign op
    logits: Any                                      # the tensor the roofline reads
    bytes_read: int                                  # bytes of logits (or top-k rows) the op reads
    queries: int | None = None
    torch_variants: dict[str, Callable[[], Any]] = field(default_factory=dict)  # pure-torch formulations
    dense: Callable[[], Any] | None = None
    dense_bytes: int | None = None                    # memory of the dense matrix
    dense_note: str = ""
    softmax: Callable[[], Any] | None = None
    check: Callable[[], Any] | None = None           # reference output for the correctness check
    extra: dict = field(default_factory=dict)


class Unavailable(Exception):
    """A case or baseline that cannot run here (missing module, over the memory budget)."""


def _api():
    from ctalign import ops
    from ctalign.ops import reference

    return ops, reference


def _on_reference(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with ctalign.ops forced onto its pure-torch path (``ctalign.reference``)."""
    from ctalign import ops

    def run():
        with ops.force_backend("reference"):
            return fn()

    return run


def _last_backend(ops) -> str | None:
    for name in ("last_backend", "backend_used", "last_backend_name"):
        f = getattr(ops, name, None)
        if f is not None:
            try:
                v = f() if callable(f) else f
            except Exception:  # noqa: BLE001 - reporting only
                return None
            return str(v) if v is not None else None
    return None


def _grouped_torch_variants(ws: Workspace, x, V: int, group_key: tuple, group_np, n_groups: int,
                            device: str) -> dict[str, Callable]:
    """Pure-torch formulations of a grouped log mass (`out[r, g] = log sum_{group[t] = g} p_r(t)`)."""
    import torch

    group = ws.table(group_key + ("long", device),
                     lambda: torch.as_tensor(group_np, dtype=torch.long, device=device))

    def index_add():
        p = torch.softmax(x[:, :V].float(), -1)
        return torch.zeros(x.shape[0], n_groups, device=x.device).index_add_(1, group, p).log()

    def make_csr():
        cols = torch.arange(V, device=device)
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=n_groups)
        crow = torch.zeros(n_groups + 1, dtype=torch.long, device=device)
        crow[1:] = torch.cumsum(counts, 0)
        vals = torch.ones(V, device=device)
        return torch.sparse_csr_tensor(crow, cols[order], vals, size=(n_groups, V))

    csr = ws.table(group_key + ("csr", device), make_csr)

    def sparse_mm():
        p = torch.softmax(x[:, :V].float(), -1)
        return (csr @ p.t()).t().log()

    from ctalign.ops import reference

    group32 = ws.table(group_key + ("int32", device),
                       lambda: torch.as_tensor(group_np, dtype=torch.int32, device=device))

    def reference_fp32():  # the reference's formulation, accumulating in float32 (its fastest)
        return reference.grouped_logmass(x, V, group32, n_groups, 1.0, accumulate=torch.float32)[0]

    return {"index_add": index_add, "sparse_mm": sparse_mm, "reference_fp32": reference_fp32}


def _dense_grouped(ws: Workspace, x, V: int, group_key: tuple, group_np, n_groups: int, device: str,
                   budget: int) -> tuple[Callable | None, int, str]:
    import torch

    need = V * n_groups * 4
    if need > budget:
        return None, need, f"needs {need / GiB:.1f} GiB > budget {budget / GiB:.1f} GiB"

    def make():
        m = torch.zeros(V, n_groups, device=device)
        m[torch.arange(V, device=device), torch.as_tensor(group_np, dtype=torch.long, device=device)] = 1.0
        return m

    key = group_key + ("dense", device)

    def dense():  # the matrix is built by the first call (run_case makes it before timing)
        return (torch.softmax(x[:, :V].float(), -1) @ ws.table(key, make)).log()

    dense.setup = lambda: ws.table(key, make)
    return dense, need, ""


def _cover_pairs(amap, order_np):
    """(teacher id, student id) of every cover relation: teacher token starts with the student's bytes."""
    import numpy as np

    lo = _map_array(amap, "cover_lo").astype(np.int64)
    hi = _map_array(amap, "cover_hi").astype(np.int64)
    lens = np.maximum(hi - lo, 0)
    s_idx = np.repeat(np.arange(len(lo)), lens)
    starts = np.repeat(lo, lens)
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    t_idx = order_np.astype(np.int64)[starts + within]
    return t_idx, s_idx


def _byte_queries(vocab, rows: int, per_row: int, seed: int = _SEED):
    """Real byte-prefix queries: for each logits row a random multi-byte teacher token, and the trie
    nodes of its proper byte prefixes (every byte offset inside it), up to ``per_row`` of them."""
    return _prefix_queries(vocab.trie, rows, per_row, seed, fall_back_to_single=False)


def _student_queries(amap, rows: int, per_row: int, seed: int = _SEED):
    """Student pieces consumed inside a teacher token: dec-trie nodes of the proper prefixes of
    ``dec_S(t)`` for a random teacher token with at least two pieces (or one, when none has two)."""
    return _prefix_queries(amap.dec_trie, rows, per_row, seed, fall_back_to_single=True)


def _prefix_queries(trie, rows: int, per_row: int, seed: int, fall_back_to_single: bool):
    """(row, node) pairs: for each row a random member with a sequence of two or more symbols, and
    the nodes of its proper prefixes from the root down, up to ``per_row`` of them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parent = _as_numpy(trie.node_parent)
    member_node = _as_numpy(trie.member_node)
    depth = _as_numpy(trie.node_depth)
    ok = member_node >= 0
    candidates = np.nonzero(ok & (depth[np.maximum(member_node, 0)] >= 2))[0]
    if fall_back_to_single and not len(candidates):
        candidates = np.nonzero(ok)[0]
    rows_out, nodes_out = [], []
    for r in range(rows):
        t = int(candidates[rng.integers(len(candidates))])
        n = int(parent[member_node[t]])  # proper prefixes: from the member's parent up to the root
        chain = []
        while n >= 0:
            chain.append(n)
            n = int(parent[n])
        for node in chain[::-1][:per_row]:
            rows_out.append(r)
            nodes_out.append(node)
    return np.asarray(rows_out, dtype=np.int64), np.asarray(nodes_out, dtype=np.int64)


def _out_cols(op: str, n_student: int | None, k: int | None = None) -> int:
    """Columns of an op's output row (for cover_topk_sparse, whose width is the most student tokens a
    row reaches, a bound: k entries of at most 16 student prefixes each)."""
    vs = n_student or 0
    k = k or 64
    return {"next_byte": 257, "byte_conditional": 257, "next_byte_topk": 257, "project": vs + 1,
            "project_within": vs + 1, "project_within_topk": vs + 1, "project_within_topk_sparse": min(k, vs + 1),
            "project_topk": vs + 1, "project_topk_sparse": min(k, vs + 1), "cover": vs, "cover_topk": vs,
            "cover_topk_sparse": min(16 * k, vs), "uld": 1, "topk_logprobs": k}[op]


def prepare(ws: Workspace, case: Case, *, dense_budget: int, mem_budget: int) -> Prepared:
    """Tensors and callables of one case; raises ``Unavailable`` when it cannot run here."""
    import torch

    ops, reference = _api()
    dev = case.device
    vt = ws.vocab(case.teacher)
    V = len(vt)
    W = _padded(V)
    itemsize = torch.tensor([], dtype=getattr(torch, _DTYPES[case.dtype])).element_size()
    amap = None
    if case.op not in _BYTE_OPS or case.op == "uld":
        if case.student is None:
            raise Unavailable(f"{case.op} needs a TEACHER:STUDENT pair")
        amap = ws.amap(case.teacher, case.student)
    Vs = _student_size(amap) if amap is not None else None
    out_cols = _out_cols(case.op, Vs, case.k)
    need = case.rows * (W * itemsize + out_cols * 4)
    if need > mem_budget:
        raise Unavailable(f"needs {need / GiB:.1f} GiB of logits and output > budget {mem_budget / GiB:.1f} GiB")
    x = ws.logits(case.rows, W, case.dtype, dev)
    softmax = lambda: torch.softmax(x[:, :V], -1, dtype=torch.float32)  # noqa: E731
    tkey = ("teacher", case.teacher)
    mkey = ("map", case.teacher, case.student)

    if case.op == "next_byte":
        fb = ws.table(tkey + ("first_byte",), lambda: _first_byte(vt))
        p = Prepared(run=lambda: ops.next_byte_logprobs(x, vt), logits=x, bytes_read=case.rows * V * itemsize,
                     softmax=softmax)
        p.torch_variants["reference"] = _on_reference(lambda: ops.next_byte_logprobs(x, vt))
        p.check = p.torch_variants["reference"]
        p.torch_variants.update(_grouped_torch_variants(ws, x, V, tkey + ("fb",), fb, 257, dev))
        p.dense, p.dense_bytes, p.dense_note = _dense_grouped(ws, x, V, tkey + ("fb",), fb, 257, dev, dense_budget)
        return p

    if case.op == "topk_logprobs":
        k = min(case.k or 64, V)
        p = Prepared(run=lambda: ops.topk_logprobs(x, k, vocab_size=V), logits=x, bytes_read=case.rows * V * itemsize,
                     softmax=softmax)
        # the usual formulation first: the scaling sections time only the first one
        p.torch_variants["topk_log_softmax"] = lambda: torch.topk(torch.log_softmax(x[:, :V].float(), -1), k, dim=-1)
        p.torch_variants["reference"] = _on_reference(lambda: ops.topk_logprobs(x, k, vocab_size=V))
        p.check = p.torch_variants["reference"]
        p.dense_note = "n/a"
        return p

    if case.op == "project":
        fs = ws.table(mkey + ("first_student",), lambda: _map_array(amap, "first_student"))
        p = Prepared(run=lambda: ops.project_to_student(x, amap), logits=x, bytes_read=case.rows * V * itemsize,
                     softmax=softmax)
        p.torch_variants["reference"] = _on_reference(lambda: ops.project_to_student(x, amap))
        p.check = p.torch_variants["reference"]
        p.torch_variants.update(_grouped_torch_variants(ws, x, V, mkey + ("fs",), fs, Vs + 1, dev))
        p.dense, p.dense_bytes, p.dense_note = _dense_grouped(ws, x, V, mkey + ("fs",), fs, Vs + 1, dev, dense_budget)
        return p

    if case.op == "cover":
        p = Prepared(run=lambda: ops.cover_logmass(x, amap), logits=x, bytes_read=case.rows * V * itemsize,
                     softmax=softmax)
        p.torch_variants["reference"] = _on_reference(lambda: ops.cover_logmass(x, amap))
        p.check = p.torch_variants["reference"]
        order = ws.table(tkey + ("order", dev), lambda: torch.as_tensor(_trie_order(vt).astype("int64"), device=dev))
        lo = ws.table(mkey + ("cover_lo", dev), lambda: torch.as_tensor(_map_array(amap, "cover_lo").astype("int64"), device=dev))
        hi = ws.table(mkey + ("cover_hi", dev), lambda: torch.as_tensor(_map_array(amap, "cover_hi").astype("int64"), device=dev))

        def prefix_sums():
            ps = torch.softmax(x[:, :V].float(), -1)[:, order].double()
            s = torch.nn.functional.pad(torch.cumsum(ps, -1), (1, 0))
            return (s[:, hi] - s[:, lo]).clamp_min(0).float().log()

        p.torch_variants["prefix_sums"] = prefix_sums
        need_d = V * Vs * 4
        p.dense_bytes = need_d
        if need_d > dense_budget:
            p.dense_note = f"needs {need_d / GiB:.1f} GiB > budget {dense_budget / GiB:.1f} GiB"
        else:
            def make():
                t_idx, s_idx = _cover_pairs(amap, _trie_order(vt))
                m = torch.zeros(V, Vs, device=dev)
                m[torch.as_tensor(t_idx, device=dev), torch.as_tensor(s_idx, device=dev)] = 1.0
                return m

            key = mkey + ("cover_dense", dev)

            def cover_dense():
                return (torch.softmax(x[:, :V].float(), -1) @ ws.table(key, make)).log()

            cover_dense.setup = lambda: ws.table(key, make)
            p.dense = cover_dense
        return p

    if case.op in ("byte_conditional", "project_within"):  # queries: (row, trie node) pairs
        if case.op == "byte_conditional":
            op, target, key, n_per_row, prefix = ops.byte_conditional_logprobs, vt, tkey + ("byte_queries", case.rows), 8, "byte"
            make_queries = lambda: _byte_queries(vt, case.rows, n_per_row)  # noqa: E731
        else:
            op, target, key, n_per_row, prefix = ops.project_to_student_within, amap, mkey + ("student_queries", case.rows), 4, "consumed"
            make_queries = lambda: _student_queries(amap, case.rows, n_per_row)  # noqa: E731
        rows_np, nodes_np = ws.table(key, make_queries)
        rows_t = torch.as_tensor(rows_np, device=dev)
        nodes_t = torch.as_tensor(nodes_np, device=dev)
        p = Prepared(run=lambda: op(x, target, rows_t, nodes_t), logits=x,
                     bytes_read=case.rows * V * itemsize, queries=len(rows_np), softmax=softmax)
        p.torch_variants["reference"] = _on_reference(lambda: op(x, target, rows_t, nodes_t))
        p.check = p.torch_variants["reference"]
        p.dense_note = f"n/a (no fixed matrix: one per {prefix} prefix)"
        return p

    if case.op in ("project_within_topk_sparse", "cover_topk_sparse"):  # TopK outputs of the dense-output ops
        k = case.k or 64
        vals, idx = torch.topk(torch.log_softmax(x[:, :V].float(), -1), min(k, V), dim=-1)
        topk = ops.TopK(idx, vals)
        if case.op == "cover_topk_sparse":
            fn, queries = (lambda t, **kw: ops.cover_logmass(t, amap, **kw)), None
        else:
            rows_np, nodes_np = ws.table(mkey + ("student_queries", case.rows),
                                         lambda: _student_queries(amap, case.rows, 4))
            rows_t, nodes_t = torch.as_tensor(rows_np, device=dev), torch.as_tensor(nodes_np, device=dev)
            fn, queries = (lambda t, **kw: ops.project_to_student_within(t, amap, rows_t, nodes_t, **kw)), len(rows_np)
        p = Prepared(run=lambda: fn(topk, sparse=True), logits=vals,
                     bytes_read=idx.numel() * idx.element_size() + vals.numel() * 4, queries=queries)
        p.extra["topk"] = topk
        p.torch_variants["dense_output"] = lambda: fn(topk)  # the same rows, a V_s-wide output row each
        p.check = p.torch_variants["dense_output"]
        p.dense = lambda: fn(x)
        return p

    if case.op == "project_within_topk":  # the dense op's queries, on the rows' top-k entries
        k = case.k or 64
        vals, idx = torch.topk(torch.log_softmax(x[:, :V].float(), -1), min(k, V), dim=-1)
        topk = ops.TopK(idx, vals)
        rows_np, nodes_np = ws.table(mkey + ("student_queries", case.rows), lambda: _student_queries(amap, case.rows, 4))
        rows_t, nodes_t = torch.as_tensor(rows_np, device=dev), torch.as_tensor(nodes_np, device=dev)
        p = Prepared(run=lambda: ops.project_to_student_within(topk, amap, rows_t, nodes_t), logits=vals,
                     bytes_read=idx.numel() * idx.element_size() + vals.numel() * 4, queries=len(rows_np))
        p.extra["topk"] = topk

        def scatter_dense():  # the kept entries scattered into dense rows (no mass elsewhere), dense op
            dense = torch.full((idx.shape[0], V), -1e4, device=dev).scatter_(1, idx, vals)
            return ops.project_to_student_within(dense, amap, rows_t, nodes_t)

        p.torch_variants["scatter_dense"] = scatter_dense
        p.check = scatter_dense
        p.dense = lambda: ops.project_to_student_within(x, amap, rows_t, nodes_t)
        return p

    if case.op in _TOPK_OPS:
        k = case.k or 64
        logp = torch.log_softmax(x[:, :V].float(), -1)
        vals, idx = torch.topk(logp, min(k, V), dim=-1)
        del logp
        topk = ops.TopK(idx, vals)
        dense_fn = {"next_byte_topk": lambda: ops.next_byte_logprobs(x, vt),
                    "project_topk": lambda: ops.project_to_student(x, amap),
                    "project_topk_sparse": lambda: ops.project_to_student(x, amap),
                    "cover_topk": lambda: ops.cover_logmass(x, amap)}[case.op]
        sparse_fn = {"next_byte_topk": lambda: ops.next_byte_logprobs(topk, vt),
                     "project_topk": lambda: ops.project_to_student(topk, amap),
                     "project_topk_sparse": lambda: ops.project_to_student(topk, amap, sparse=True),
                     "cover_topk": lambda: ops.cover_logmass(topk, amap)}[case.op]
        p = Prepared(run=sparse_fn, logits=vals, bytes_read=idx.numel() * idx.element_size() + vals.numel() * 4)
        p.extra["topk"] = topk
        # sparse rows run the compiled O(k) kernels on CPU (pure torch elsewhere); the alternatives
        # timed here are a direct scatter (grouped ops), scattering the rows back to dense [N, V]
        # (cover) and, for the sparse output, the same op on ctalign's pure-torch path
        if case.op == "project_topk_sparse":  # the alternative: the same sparse output in pure torch
            p.torch_variants["reference"] = _on_reference(sparse_fn)
        elif case.op in ("next_byte_topk", "project_topk"):
            gnp = ws.table(tkey + ("first_byte",), lambda: _first_byte(vt)) if case.op == "next_byte_topk" \
                else ws.table(mkey + ("first_student",), lambda: _map_array(amap, "first_student"))
            G = 257 if case.op == "next_byte_topk" else Vs + 1
            gkey = tkey + ("fb",) if case.op == "next_byte_topk" else mkey + ("fs",)
            group = ws.table(gkey + ("long", dev), lambda: torch.as_tensor(gnp, dtype=torch.long, device=dev))

            def scatter_add():
                return torch.zeros(idx.shape[0], G, device=dev).scatter_add_(1, group[idx], vals.exp()).log()

            p.torch_variants["scatter_add"] = scatter_add
        else:
            order = ws.table(tkey + ("order", dev), lambda: torch.as_tensor(_trie_order(vt).astype("int64"), device=dev))
            lo = ws.table(mkey + ("cover_lo", dev), lambda: torch.as_tensor(_map_array(amap, "cover_lo").astype("int64"), device=dev))
            hi = ws.table(mkey + ("cover_hi", dev), lambda: torch.as_tensor(_map_array(amap, "cover_hi").astype("int64"), device=dev))

            def scatter_dense():
                dense = torch.zeros(idx.shape[0], V, dtype=torch.float64, device=dev).scatter_(1, idx, vals.double().exp())
                s = torch.nn.functional.pad(torch.cumsum(dense[:, order], -1), (1, 0))
                return (s[:, hi] - s[:, lo]).clamp_min(0).float().log()

            p.torch_variants["scatter_dense"] = scatter_dense
        p.check = next(iter(p.torch_variants.values()))
        p.dense = dense_fn  # the dense path: the same op over the full logits row
        p.dense_note = "dense path: the same op on the full logits"
        return p

    if case.op == "uld":
        return _prepare_uld(ws, case, x, V, amap, dev)

    raise Unavailable(f"unknown op {case.op!r}")


def _prepare_uld(ws: Workspace, case: Case, x, V: int, amap, dev: str) -> Prepared:
    """ULD between teacher logits and student logits over different vocabularies, one pair of rows
    per position: ``ctalign.losses.uld_loss`` with ``top_k`` (CE term off) against the full
    sort-based formulation (sort both softmaxes, zero-pad, L1), written here and as uld_loss's own
    ``top_k=None`` path."""
    import torch

    try:
        from ctalign.losses import uld_loss
    except ImportError as e:
        raise Unavailable(f"ctalign.losses is not importable: {e}") from None
    Vs = _student_size(amap)
    g = torch.Generator(device=dev).manual_seed(_SEED + 1)
    xs = torch.randn(case.rows, _padded(Vs), generator=g, device=dev).mul_(3.0).to(x.dtype)
    ids = torch.randint(0, Vs, (1, case.rows), generator=g, device=dev)
    k = case.k or 64
    xs3, x3 = xs[None], x[None]

    def run(top_k):
        return lambda: uld_loss(xs3, x3, ids, top_k=top_k, ce_weight=0.0, student_vocab_size=Vs,
                                teacher_vocab_size=V, chunk_size=max(256, case.rows))

    def sort_based():
        pt = torch.softmax(x[:, :V].float(), -1).sort(-1, descending=True).values
        ps = torch.softmax(xs[:, :Vs].float(), -1).sort(-1, descending=True).values
        n = max(V, Vs)
        pt = torch.nn.functional.pad(pt, (0, n - V))
        ps = torch.nn.functional.pad(ps, (0, n - Vs))
        return (pt - ps).abs().sum(-1).mean()

    itemsize = x.element_size()
    p = Prepared(run=run(k), logits=x, bytes_read=case.rows * (V + Vs) * itemsize,
                 softmax=lambda: torch.softmax(x[:, :V], -1, dtype=torch.float32))
    p.torch_variants = {"sort": sort_based, "uld_loss_full_sort": run(None)}
    p.dense_note = "n/a"
    return p
