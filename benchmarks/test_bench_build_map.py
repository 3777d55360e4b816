"""pytest-benchmark suite of vocabulary parsing and ``build_map`` on real tokenizer pairs.

Parsing (``load_vocab``) and building (``build_map`` from loaded vocabularies, their compiled tables
already cached) are timed separately. Peak memory per build is measured by ``ctalign bench``
(``--sections build_map``), which runs each build in its own process.

    pytest benchmarks/test_bench_build_map.py --benchmark-only
"""
from __future__ import annotations

import pytest

from ctalign import bench

PAIRS = [("gpt2", "mistral-v1"), ("cl100k", "gpt2"), ("llama3", "qwen"), ("qwen", "llama3"),
         ("deepseek", "qwen"), ("tekken", "llama3")]


@pytest.mark.parametrize("name", list(bench.VOCABS))
def test_parse_vocab(benchmark, name):
    benchmark.group = "parse vocabulary"
    vocab = benchmark.pedantic(bench.load_bench_vocab, args=(name,), rounds=2, iterations=1)
    benchmark.extra_info["size"] = len(vocab)


@pytest.mark.parametrize("teacher,student", PAIRS, ids=[f"{t}:{s}" for t, s in PAIRS])
def test_build_map(benchmark, workspace, teacher, student):
    from ctalign.alignment_map import build_map

    vt, vs = workspace.vocab(teacher), workspace.vocab(student)
    benchmark.group = "build_map"
    amap = benchmark.pedantic(build_map, args=(vt, vs), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"V_teacher": len(vt), "V_student": len(vs), "regime": str(amap.regime)})


@pytest.mark.parametrize("step", ["from_ranks", "encode_many"])
def test_merge_table_qwen(benchmark, workspace, step):
    """The compiled BPE of Qwen's 151,643 ranks: recovering its merges from the ranks, and encoding every
    token's bytes with it (was a timed test in tests/test_merge_table.py)."""
    from ctalign import _core

    v = workspace.vocab("qwen")
    table, priority = v.table, v.priority()
    benchmark.group = "merge table (qwen)"
    if step == "from_ranks":
        benchmark.pedantic(_core.MergeTable.from_ranks, args=(table, priority), rounds=3, iterations=1)
    else:
        mt = _core.MergeTable.from_ranks(table, priority)
        benchmark.pedantic(mt.encode_many, args=(table.offsets, table.data), rounds=3, iterations=1)
