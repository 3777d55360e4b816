"""The list of cases a command line asks for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ctalign.bench.config import (GiB, VOCABS, SYNTHETIC_VOCAB, OPS, _TOPK_OPS)
from ctalign.bench.cases import Case


@dataclass
class Options:
    quick: bool = False
    target_s: float = 0.4
    min_reps: int = 3
    dense_budget: int = 8 * GiB
    mem_budget: int = 8 * GiB
    mem_budget_cuda: int = 8 * GiB
    check: bool = True
    all_torch_variants: bool = False
    dense_path_memo: dict = field(default_factory=dict)


HEADLINE_PAIRS = [("qwen", "llama3"), ("gpt2", "mistral-v1"), (SYNTHETIC_VOCAB, "llama3")]


def plan(args, devices: list[str]) -> list[Case]:
    """The cases to run, from the command line."""
    quick = args.quick
    ops_sel = args.ops or list(OPS)
    sections = set(args.sections)
    cases: list[Case] = []
    cpu_threads = os.cpu_count() or 1

    for dev in devices:
        cuda = dev.startswith("cuda")
        rows = args.rows or (16 if quick else (4096 if cuda else 256))
        pairs = args.pairs or ([("gpt2", "mistral-v1")] if quick else HEADLINE_PAIRS)
        dtypes = args.dtypes or ["fp32"]
        if "ops" in sections:
            for i, (t, s) in enumerate(pairs):
                for op in ops_sel:
                    if (op in _TOPK_OPS or op == "uld") and not args.pairs and i > 0:
                        continue  # top-k and ULD at the first (150k) pair only
                    if op in ("byte_conditional", "project_within") and not args.pairs and i > 0:
                        continue  # within-token queries at the first pair only
                    if op == "cover" and not args.pairs and t == SYNTHETIC_VOCAB:
                        continue
                    k = (args.k or 64) if op in _TOPK_OPS or op in ("uld", "topk_logprobs") else None
                    for dt in dtypes:
                        cases.append(Case("ops", op, t, s, dt, rows, k, dev))
                    # bf16 logits, the usual training dtype, for the main ops at the first pair
                    if not args.dtypes and not quick and i == 0 and op in ("next_byte", "project"):
                        cases.append(Case("ops", op, t, s, "bf16", rows, k, dev))
        scaling = ("roofline", "torch")
        if "rows" in sections:
            if quick:
                series = [("next_byte", "mistral-v1", None, [1, 16])]
            elif cuda:
                series = [("next_byte", "qwen", None, [1, 16, 256, 1024, 4096, 16384]),
                          ("project", "qwen", "llama3", [1, 16, 256, 1024, 4096, 16384])]
            else:
                series = [("next_byte", "mistral-v1", None, [1, 4, 16, 64, 256, 1024, 4096, 16384]),
                          ("next_byte", "qwen", None, [1, 16, 256, 1024, 4096]),
                          ("project", "qwen", "llama3", [1, 16, 256, 1024])]
            for op, t, s, rs in series:
                if op in ops_sel:
                    for r in rs:
                        cases.append(Case("rows", op, t, s, "fp32", r, None, dev, baselines=scaling))
        if "vocab" in sections:
            names = ["mistral-v1", "gpt2"] if quick else list(VOCABS) + [SYNTHETIC_VOCAB]
            student = "mistral-v1"
            vrows = 16 if quick else (4096 if cuda else 256)
            for t in names:
                if "next_byte" in ops_sel:
                    cases.append(Case("vocab", "next_byte", t, None, "fp32", vrows, None, dev, baselines=scaling))
                if "project" in ops_sel:
                    cases.append(Case("vocab", "project", t, student if t != student else "gpt2", "fp32", vrows,
                                      None, dev, baselines=scaling))
        if "k" in sections:
            ks = [1, 64] if quick else [1, 4, 16, 64, 256, 1024]
            t, s = ("gpt2", "mistral-v1") if quick else ("qwen", "llama3")
            krows = 16 if quick else (4096 if cuda else 256)
            for op in ("next_byte_topk", "project_topk", "topk_logprobs"):
                if op in ops_sel:
                    # project_topk writes a dense [N, V_s + 1] output whatever k: three points show it
                    for k in (ks if op != "project_topk" or quick else [1, 64, 1024]):
                        cases.append(Case("k", op, t, s, "fp32", krows, k, dev, baselines=("roofline", "torch", "dense")))
        if "threads" in sections and not cuda:
            counts = sorted({1, cpu_threads} | {2 ** i for i in range(8) if 2 ** i <= cpu_threads})
            if quick:
                counts = sorted({1, cpu_threads})
            t, s = ("gpt2", "mistral-v1") if quick else ("qwen", "llama3")
            trows = 16 if quick else 256
            for op in ("next_byte", "project"):
                if op in ops_sel:
                    for n in counts:
                        cases.append(Case("threads", op, t, s, "fp32", trows, None, dev, threads=n, baselines=scaling))
    return cases


def build_map_pairs(args) -> list[tuple[str, str]]:
    if args.quick:
        return [("gpt2", "mistral-v1")]
    return [("mistral-v1", "gpt2"), ("gpt2", "mistral-v1"), ("cl100k", "gpt2"), ("llama3", "qwen"),
            ("deepseek", "qwen"), ("tekken", "llama3"), ("qwen", "llama3"), (SYNTHETIC_VOCAB, "llama3")]
