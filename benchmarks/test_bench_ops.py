"""pytest-benchmark suite of the projection ops and their baselines.

One benchmark per (op, implementation, device), grouped by op so that pytest-benchmark's table puts
each op next to its baselines:

- ``ctalign``: the op from ``ctalign.ops`` (whichever backend serves it; recorded in extra_info);
- ``roofline``: ``torch.sum(logits, -1)`` over the same tensor;
- ``write``: ``fill_`` of a tensor shaped like the op's output (dense-logits ops): with the roofline,
  the time an op that reads the logits once and writes its output once would take;
- ``softmax``: ``torch.softmax`` alone;
- ``reference`` and the other pure-torch formulations (``reference_fp32``, ``index_add``,
  ``sparse_mm``, ``prefix_sums``, ``scatter_add``, ``scatter_dense``, ``sort``,
  ``uld_loss_full_sort``, ``topk_log_softmax``; see docs/benchmarks.md), where the op has them;
- ``dense``: the dense mapping-matrix product (skipped, with the memory it would need, when the
  matrix is over the budget); for top-k ops, the same op over the full logits.

    pytest benchmarks --benchmark-only
    CTALIGN_BENCH_PAIR=gpt2:mistral-v1 pytest benchmarks --benchmark-only -k next_byte
"""
from __future__ import annotations

import pytest
import torch


OPS = ["next_byte", "byte_conditional", "project", "project_within", "cover",
       "next_byte_topk", "project_topk", "project_topk_sparse", "cover_topk", "project_within_topk",
       "project_within_topk_sparse", "cover_topk_sparse", "uld", "topk_logprobs"]
IMPLS = ["ctalign", "roofline", "write", "softmax", "reference", "reference_fp32", "index_add", "sparse_mm",
         "prefix_sums", "scatter_add", "scatter_dense", "dense_output", "sort", "uld_loss_full_sort",
         "topk_log_softmax", "dense"]


def _pick(p, op: str, impl: str):
    if impl == "ctalign":
        return p.run
    if impl == "roofline":
        x = p.logits
        return lambda: torch.sum(x, -1)
    if impl == "write":
        out = p.run() if "_topk" not in op else None
        if not isinstance(out, torch.Tensor):
            pytest.skip("write: the op reads top-k rows or returns no single dense tensor")
        sink = torch.empty_like(out)
        return lambda: sink.fill_(0.0)
    if impl == "softmax":
        if p.softmax is None:
            pytest.skip("no softmax baseline for this op")
        return p.softmax
    if impl == "dense":
        if p.dense is None:
            pytest.skip(f"dense: {p.dense_note}")
        return p.dense
    if impl not in p.torch_variants:
        pytest.skip(f"no {impl} formulation of this op")
    return p.torch_variants[impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, prepared_cases, bench_settings, device, op, impl):
    k = 64 if "_topk" in op or op in ("uld", "topk_logprobs") else None
    p = prepared_cases(op, device, k)
    fn = _pick(p, op, impl)
    pair, dtype = ":".join(bench_settings["pair"]), bench_settings["dtype"]
    benchmark.group = f"{op} {pair} {dtype} {device}"
    benchmark.extra_info.update({"impl": impl, "bytes_read": p.bytes_read, "queries": p.queries, "k": k,
                                 "pair": pair, "dtype": dtype, "device": device})
    if impl == "dense" and p.dense_bytes:
        benchmark.extra_info["dense_matrix_bytes"] = p.dense_bytes
    fn()  # warm-up: table uploads, allocator, lazy initialisation
    if impl == "ctalign":
        from ctalign import bench, ops

        benchmark.extra_info["backend"] = bench._last_backend(ops)
    benchmark(bench_settings["timed"](fn, device))
