"""pytest-benchmark of one loss step (forward + backward) of BPM, ESCD and strict-alignment KD (#16),
ctalign's compiled kernels against the same loss on the pure-torch formulation
(``ops.force_backend("reference")``: the grouped projections and trie-range sums in torch ops).

    pytest benchmarks/test_bench_byte_prefix.py --benchmark-only
    CTALIGN_LOSS_BENCH_PAIR=qwen:llama3 CTALIGN_LOSS_BENCH_SHAPE=4x256 pytest benchmarks/test_bench_byte_prefix.py

Settings (environment): ``CTALIGN_LOSS_BENCH_PAIR`` teacher:student asset names (default
``llama3:mistral-v1``: the student splits the teacher's tokens, so ESCD has child states),
``CTALIGN_LOSS_BENCH_SHAPE`` texts x teacher tokens (default ``4x256``). The batch is the collator's
over slices of the botchan text; logits are random (the step's cost does not depend on their values).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

PAIR = tuple(os.environ.get("CTALIGN_LOSS_BENCH_PAIR", "llama3:mistral-v1").split(":"))
SHAPE = tuple(int(x) for x in os.environ.get("CTALIGN_LOSS_BENCH_SHAPE", "4x256").split("x"))


@functools.lru_cache(maxsize=None)
def loss_case():
    """(amap, batch, teacher logits, student logits) for PAIR and SHAPE."""
    from ctalign import assets, build_map, load_vocab
    from ctalign.data import DistillationCollator
    t, s = (load_vocab(assets.path(n), name=n) for n in PAIR)
    amap = build_map(t, s)
    text = assets.path("botchan-text").read_text(encoding="utf-8")
    n_texts, n_tokens = SHAPE
    base = t.encode(text[:200000])
    texts = [t.decode_bytes(base[3000 + 911 * i: 3000 + 911 * i + n_tokens - 2]).decode("utf-8", errors="ignore")
             for i in range(n_texts)]
    batch = DistillationCollator(amap)(texts)
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(*batch["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 3
    sl = torch.randn(*batch["student_input_ids"].shape, amap.n_student, generator=g) * 3
    from ctalign.prefix_groups import prefix_groups
    prefix_groups(amap)  # the per-map tables, built once outside the timed step
    return amap, batch, tl, sl


def _step(kind: str, backend: str | None):
    from ctalign import losses as L, ops
    amap, b, tl, sl = loss_case()
    s = sl.clone().requires_grad_(True)
    fn = {"bpm": L.bpm_loss, "escd": L.escd_loss, "strict_kd": L.strict_kd_loss}[kind]

    def run():
        s.grad = None
        with ops.force_backend(backend):
            fn(s, tl, b["student_input_ids"], b["alignment"], amap, student_mask=b["student_loss_mask"]).backward()
    return run


@pytest.mark.parametrize("backend", [None, "reference"], ids=["ctalign", "pure_torch"])
@pytest.mark.parametrize("kind", ["bpm", "escd", "strict_kd"])
def test_byte_prefix_loss_step(benchmark, kind, backend):
    benchmark.group = f"loss step {kind} {PAIR[0]}->{PAIR[1]} {SHAPE[0]}x{SHAPE[1]}"
    benchmark.extra_info.update(pair=":".join(PAIR), shape=list(SHAPE), backend=backend or "compiled")
    run = _step(kind, backend)
    run()  # tables to the device, caches warm
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
