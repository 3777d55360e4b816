"""pytest-benchmark of one loss step (forward + backward) of the likelihood and BLD losses, per target
construction (``targets="boundary"``: the teacher-boundary-conditioned fast form; ``"exact"``: the
default, the exact next-unit distributions composed from two teacher rows).

    pytest benchmarks/test_bench_loss_step.py --benchmark-only
    CTALIGN_LOSS_BENCH_PAIR=llama3:mistral-v1 CTALIGN_LOSS_BENCH_SHAPE=4x256 pytest benchmarks/test_bench_loss_step.py

Settings (environment): ``CTALIGN_LOSS_BENCH_PAIR`` teacher:student asset names (default
``llama3:mistral-v1``, a general-regime pair), ``CTALIGN_LOSS_BENCH_SHAPE`` texts x teacher tokens
(default ``4x256``). The batch is the collator's over slices of the botchan text (byte queries 8 for
BLD); logits are random (the loss step's cost does not depend on their values).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

PAIR = tuple(os.environ.get("CTALIGN_LOSS_BENCH_PAIR", "llama3:mistral-v1").split(":"))
SHAPE = tuple(int(x) for x in os.environ.get("CTALIGN_LOSS_BENCH_SHAPE", "4x256").split("x"))
K = 8


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
    batch = DistillationCollator(amap, byte_queries=K)(texts)
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(*batch["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 3
    sl = torch.randn(*batch["student_input_ids"].shape, amap.n_student, generator=g) * 3
    return amap, batch, tl, sl


def _step(kind: str, targets: str):
    from ctalign import losses as L
    amap, b, tl, sl = loss_case()
    s = sl.clone().requires_grad_(True)
    kw = {} if targets == "legacy" else {"targets": targets}
    if kind == "likelihood":
        def run():
            s.grad = None
            L.likelihood_distillation_loss(s, tl, b["student_input_ids"], b["alignment"], amap,
                                           student_mask=b["student_loss_mask"], **kw).backward()
    else:
        head = torch.randn(*sl.shape[:2], K, 257).requires_grad_(True)

        def run():
            s.grad = head.grad = None
            L.byte_level_distillation_loss(s, head, tl, b["student_input_ids"], b["alignment"],
                                           student_vocab=amap.student, teacher_vocab=amap.teacher,
                                           student_mask=b["student_loss_mask"], **kw).backward()
    return run


@pytest.mark.parametrize("targets", ["boundary", "exact"])
@pytest.mark.parametrize("kind", ["likelihood", "bld"])
def test_loss_step(benchmark, kind, targets):
    benchmark.group = f"loss step {kind} {PAIR[0]}->{PAIR[1]} {SHAPE[0]}x{SHAPE[1]}"
    benchmark.extra_info.update(pair=":".join(PAIR), shape=list(SHAPE), targets=targets)
    benchmark.pedantic(_step(kind, targets), rounds=5, warmup_rounds=1)
