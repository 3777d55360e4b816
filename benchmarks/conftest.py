"""Fixtures of the pytest-benchmark suite (``pytest benchmarks --benchmark-only``).

The suite times the same cases as ``ctalign bench`` (it reuses ``ctalign.bench.prepare``), one
benchmark per (op, implementation), so pytest-benchmark's comparison tables and ``--benchmark-json``
work on them. Settings, by environment variable:

- ``CTALIGN_BENCH_PAIR`` teacher:student of the op benchmarks (default ``qwen:llama3``; names as in
  ``ctalign bench --pairs``);
- ``CTALIGN_BENCH_ROWS`` logits rows (default 256; 4096 on CUDA);
- ``CTALIGN_BENCH_DTYPE`` fp32 | bf16 | fp16 (default fp32);
- ``CTALIGN_BENCH_DENSE_GIB`` largest dense mapping matrix to build (default 8).

Tokenizer assets come from ``ctalign.assets`` (cached in ``$CTALIGN_CACHE``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_TREE_HAS_MODULE = any((_ROOT / "python" / "ctalign").glob("_core*.so"))  # built by tools/dev-build
if _TREE_HAS_MODULE and str(_ROOT / "python") not in sys.path and not os.environ.get("CTALIGN_BENCH_INSTALLED"):
    sys.path.insert(0, str(_ROOT / "python"))  # a developer's built working tree; else the installed package

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

from ctalign import bench  # noqa: E402

PAIR = bench._parse_pair(os.environ.get("CTALIGN_BENCH_PAIR", "qwen:llama3"))
DTYPE = os.environ.get("CTALIGN_BENCH_DTYPE", "fp32")
DENSE_BUDGET = int(float(os.environ.get("CTALIGN_BENCH_DENSE_GIB", "8")) * bench.GiB)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    # torch's sparse CSR tensors (one pure-torch baseline) warn that they are beta
    config.addinivalue_line("filterwarnings", "ignore:.*[Ss]parse.*:UserWarning")


def rows_for(device: str) -> int:
    default = "4096" if device == "cuda" else "256"
    return int(os.environ.get("CTALIGN_BENCH_ROWS", default))


@pytest.fixture(scope="session")
def bench_settings():
    return {"pair": PAIR, "dtype": DTYPE, "dense_budget": DENSE_BUDGET, "devices": DEVICES, "timed": timed}


@pytest.fixture(scope="session")
def workspace():
    return bench.Workspace(log=lambda msg: None)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="session")
def prepared_cases(workspace):
    """``get(op, device, k=None)``: the prepared case (cached per session; one logits tensor is
    shared by the cases of a device)."""
    cache: dict[tuple, bench.Prepared] = {}

    def get(op: str, device: str, k: int | None = None) -> bench.Prepared:
        key = (op, device, k)
        if key not in cache:
            teacher, student = PAIR
            case = bench.Case("pytest", op, teacher, student, DTYPE, rows_for(device), k, device)
            mem = bench.GiB * 8 if device == "cpu" else int(0.3 * torch.cuda.get_device_properties(0).total_memory)
            try:
                cache[key] = bench.prepare(workspace, case, dense_budget=DENSE_BUDGET, mem_budget=mem)
            except bench.Unavailable as e:
                pytest.skip(str(e))
        return cache[key]

    return get


def timed(fn, device: str):
    """``fn`` followed by a device synchronisation, so the benchmark times the work, not the launch."""
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn
