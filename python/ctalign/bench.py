"""Throughput benchmarks of the alignment ops: ``ctalign bench`` (also ``python -m ctalign.bench``).

Every op is timed next to baselines measured in the same run, on the same tensors:

- ``roofline``: ``torch.sum(logits, -1)`` over the same tensor, the read bandwidth of the machine;
  with ``fill_`` of a tensor shaped like the op's output (dense ops), the ``I/O bound``: the roofline
  share an op that reads the logits once and writes its output once at torch's speed would reach;
- ``torch``: the fastest pure-torch formulation of the op (``ctalign.reference`` and the alternatives
  written here: ``index_add``, sparse CSR products, prefix sums, a sort-based ULD), the best one named;
- ``dense``: the mapping-matrix approach, ``log(softmax(logits) @ M)`` with ``M`` a dense
  ``V_teacher x C`` matrix, run where ``M`` fits ``--dense-budget-gib``; otherwise the memory it would
  need is reported instead; for top-k rows the "dense path" is the same op on the full logits;
- ``softmax``: ``torch.softmax`` alone, what a fused kernel saves.

Times are medians of repeats after a warm-up (CUDA: events and ``torch.cuda.synchronize``), with the
inter-quartile range. Speed is never asserted: the numbers are printed, written as JSON (``--json``)
and plotted (``--plot``). ``docs/benchmarks.md`` explains every column.

    ctalign bench --quick --json bench.json --plot bench.png
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["main", "run", "Timing", "measure", "VOCABS", "SYNTHETIC_VOCAB", "OPS"]

GiB = 1 << 30
MiB = 1 << 20

# Short names of the real vocabularies (ctalign.assets names), smallest first; sizes with specials.
VOCABS: dict[str, str] = {
    "mistral-v1": "mistral-v1",      # SentencePiece BPE with byte fallback, 32,000
    "gpt2": "gpt2-encoder",          # GPT-2 encoder.json + vocab.bpe (gpt2-merges), 50,257
    "cl100k": "cl100k",              # tiktoken ranks, 100,277
    "llama3": "llama3",              # HF byte-level BPE, 128,256
    "deepseek": "deepseek-v3",       # HF byte-level BPE, 129,280
    "tekken": "tekken",              # Mistral Tekken, 131,072
    "qwen": "qwen",                  # tiktoken ranks, 151,851
}
# No public 262k tokenizer ships in a registry package: this vocabulary is the union of the byte
# strings of several real vocabularies, cut to 262,144 tokens (see ``synthetic_vocab``).
SYNTHETIC_VOCAB = "union262k"
SYNTHETIC_SIZE = 262_144
_UNION_SOURCES = ("qwen", "llama3", "deepseek", "tekken", "cl100k", "gpt2", "mistral-v1", "bert-uncased")

# Ops of ctalign.ops the suite times (`--ops`), and what each reads.
OPS = {
    "next_byte": "next_byte_logprobs(logits, vocab) -> [N, 257]",
    "byte_conditional": "byte_conditional_logprobs(logits, vocab, rows, prefixes) -> [Q, 257]",
    "project": "project_to_student(logits, amap) -> [N, V_s + 1]",
    "project_within": "project_to_student_within(logits, amap, rows, consumed) -> [Q, V_s + 1]",
    "cover": "cover_logmass(logits, amap) -> [N, V_s]",
    "next_byte_topk": "next_byte_logprobs(TopK) -> [N, 257]",
    "project_topk": "project_to_student(TopK) -> [N, V_s + 1]",
    "project_topk_sparse": "project_to_student(TopK, sparse=True) -> TopK [N, k]",
    "cover_topk": "cover_logmass(TopK) -> [N, V_s]",
    "project_within_topk": "project_to_student_within(TopK, amap, rows, consumed) -> [Q, V_s + 1]",
    "project_within_topk_sparse": "project_to_student_within(TopK, ..., sparse=True) -> TopK [Q, k]",
    "cover_topk_sparse": "cover_logmass(TopK, sparse=True) -> TopK [N, w]",
    "uld": "ULD loss, top-k (ctalign.losses) vs the full sort-based formulation",
    "topk_logprobs": "topk_logprobs(logits, k) -> TopK [N, k] (e.g. caching a teacher's outputs)",
}
_BYTE_OPS = {"next_byte", "byte_conditional", "next_byte_topk", "topk_logprobs"}  # teacher-only ops
_TOPK_OPS = {"next_byte_topk", "project_topk", "project_topk_sparse", "cover_topk", "project_within_topk",
             "project_within_topk_sparse", "cover_topk_sparse"}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_PAD_TO = 128  # logits widths are rounded up like a model's padded output layer
_SEED = 1234


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Median and inter-quartile range of repeated timings, in seconds per call."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Timing":
        if not samples:
            raise ValueError("no timing samples")
        s = sorted(samples)
        if len(s) == 1:
            return cls(s[0], s[0], s[0], 1)
        q = statistics.quantiles(s, n=4, method="inclusive")
        return cls(statistics.median(s), q[0], q[2], len(s))

    def as_dict(self) -> dict:
        return {"time_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "n": self.n}


def call_timed(fn: Callable[[], Any], *, cuda: bool = False) -> tuple[Any, float]:
    """One call of ``fn``: (its output, seconds), synchronised on CUDA."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(fn: Callable[[], Any], *, cuda: bool = False, target_s: float = 0.5, min_reps: int = 3,
            max_reps: int = 100, slow_s: float = 2.0, first_s: float | None = None) -> Timing:
    """Time ``fn``: one warm-up call, then repeats until about ``target_s`` (median, IQR).

    ``first_s``: the caller already made the warm-up call, which took that long. A warm-up slower
    than ``slow_s`` counts as the only sample (big dense baselines, slow pure-torch paths): timing
    them again would say little more at a high price. Calls faster than 1 ms are batched so each
    sample is about 1 ms. On CUDA each sample is bracketed by CUDA events on the current stream.
    """
    import torch

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        first = first_s if first_s is not None else call_timed(fn, cuda=cuda)[1]
        if first >= slow_s:
            return Timing.from_samples([first])
        inner = max(1, min(1000, int(1e-3 / max(first, 1e-7))))
        reps = max(min_reps, min(max_reps, int(target_s / max(first * inner, 1e-7))))
        samples = []
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(reps):
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e-3 / inner)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t0) / inner)
        return Timing.from_samples(samples)
    finally:
        if gc_was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# vocabularies, maps and tensors
# --------------------------------------------------------------------------------------------
def load_bench_vocab(name: str):
    """A benchmark vocabulary by short name (``VOCABS`` keys or ``SYNTHETIC_VOCAB``)."""
    from . import assets
    from .vocab import load_vocab

    if name == SYNTHETIC_VOCAB:
        return synthetic_vocab()
    if name not in VOCABS:
        raise ValueError(f"unknown benchmark vocabulary {name!r}; known: "
                         f"{', '.join(list(VOCABS) + [SYNTHETIC_VOCAB])}")
    if name == "gpt2":  # GPT-2's own pair of files
        return load_vocab((assets.path("gpt2-encoder"), assets.path("gpt2-merges")), name="gpt2")
    return load_vocab(assets.path(VOCABS[name]), name=name)


class _GreedyEncoder:
    """Encoder of the synthetic vocabulary, which has no merges of its own: greedy longest match
    over its token bytes (every single byte is a token, so any byte string encodes)."""

    def __init__(self, pieces: list[bytes | None]):
        self.index: dict[bytes, int] = {}
        for i, b in enumerate(pieces):
            if b is not None:
                self.index.setdefault(b, i)
        self.max_len = max(map(len, self.index))

    def encode_bytes(self, b: bytes) -> list[int]:
        out, i = [], 0
        while i < len(b):
            for n in range(min(self.max_len, len(b) - i), 0, -1):
                t = self.index.get(b[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                raise ValueError(f"byte {b[i]:#04x} is not a token of {SYNTHETIC_VOCAB}")
        return out

    def encode_text(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_raw_texts(self, texts: list[str]) -> list[list[int]]:
        return [self.encode_text(t) for t in texts]

    def encode_raw_invalid(self, pieces: list[bytes]) -> list[list[int]]:
        return [self.encode_bytes(p) for p in pieces]

    def normalize(self, text: str) -> str:
        return text


def synthetic_vocab(size: int = SYNTHETIC_SIZE):
    """A ``size``-token vocabulary made of real token byte strings: the union of the byte strings of
    several real vocabularies (``_UNION_SOURCES``, in that order, first occurrence kept), cut to
    ``size - 1``, plus one special (eos) as the last id. Stands in for the 256k-class tokenizers
    (Gemma) that no registry package ships. Its encoder is a greedy longest match (see
    ``_GreedyEncoder``): use it as a teacher, whose tables are all the ops and build_map read."""
    from . import assets
    from .vocab import Vocab, load_vocab

    seen: set[bytes] = set()
    pieces: list[bytes | None] = []
    for src in _UNION_SOURCES:
        v = load_bench_vocab(src) if src in VOCABS else load_vocab(assets.path(src), name=src)
        for b in v.all_token_bytes():
            if b is not None and b not in seen:
                seen.add(b)
                pieces.append(b)
        if len(pieces) >= size - 1:
            break
    if len(pieces) < size - 1:
        raise RuntimeError(f"the union of {', '.join(_UNION_SOURCES)} holds only {len(pieces)} "
                           f"distinct tokens, fewer than {size - 1}")
    pieces = pieces[:size - 1] + [None]
    eos = size - 1
    return Vocab(name=SYNTHETIC_VOCAB, source="union of " + ", ".join(_UNION_SOURCES), kind="byte_bpe",
                 pieces=pieces, special_text={eos: "<|endoftext|>"}, roles={eos: "eos"},
                 backend=_GreedyEncoder(pieces))


def _parse_pair(text: str) -> tuple[str, str]:
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"a pair is TEACHER:STUDENT, got {text!r}")
    t, s = text.split(":", 1)
    for n in (t, s):
        if n not in VOCABS and n != SYNTHETIC_VOCAB:
            raise argparse.ArgumentTypeError(
                f"unknown vocabulary {n!r} in pair {text!r}; known: {', '.join(list(VOCABS) + [SYNTHETIC_VOCAB])}")
    return t, s


def _padded(v: int) -> int:
    return -(-v // _PAD_TO) * _PAD_TO


def _as_numpy(x):
    """A writable numpy copy of a core array or tensor (torch refuses read-only numpy views)."""
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


class Workspace:
    """Vocabularies, maps, their tables as tensors, and logits, loaded once per run."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self._vocabs: dict[str, Any] = {}
        self._maps: dict[tuple[str, str], Any] = {}
        self._tensors: dict[tuple, Any] = {}
        self._logits_key: tuple | None = None
        self._logits = None

    def vocab(self, name: str):
        if name not in self._vocabs:
            t0 = time.perf_counter()
            self._vocabs[name] = load_bench_vocab(name)
            self.log(f"  loaded {name} ({len(self._vocabs[name]):,} tokens) in {time.perf_counter() - t0:.1f} s")
        return self._vocabs[name]

    def amap(self, teacher: str, student: str):
        key = (teacher, student)
        if key not in self._maps:
            from .alignment_map import build_map

            vt, vs = self.vocab(teacher), self.vocab(student)
            t0 = time.perf_counter()
            self._maps[key] = build_map(vt, vs)
            self.log(f"  built map {teacher} -> {student} ({self._maps[key].regime}) in {time.perf_counter() - t0:.1f} s")
        return self._maps[key]

    def table(self, key: tuple, make: Callable[[], Any]):
        """A derived tensor (group arrays, dense matrices...) cached under ``key``."""
        if key not in self._tensors:
            self._tensors[key] = make()
        return self._tensors[key]

    def drop_tables(self, pred: Callable[[tuple], bool]) -> None:
        for k in [k for k in self._tensors if pred(k)]:
            del self._tensors[k]

    def logits(self, rows: int, width: int, dtype: str, device: str):
        """Random logits ``[rows, width]`` (N(0, 3^2), fixed seed); one tensor kept at a time."""
        import torch

        key = (rows, width, dtype, device)
        if self._logits_key != key:
            self._logits = None
            gc.collect()
            g = torch.Generator(device=device).manual_seed(_SEED)
            x = torch.randn(rows, width, generator=g, device=device, dtype=torch.float32)
            x.mul_(3.0)
            self._logits = x.to(getattr(torch, _DTYPES[dtype]))
            self._logits_key = key
        return self._logits

    def release_logits(self) -> None:
        self._logits = None
        self._logits_key = None
        gc.collect()


# tables of vocabularies and maps (numpy views from the core, as torch tensors) ------------------
def _first_byte(vocab):
    trie = vocab.trie
    fb = getattr(trie, "first_byte", None)
    return _as_numpy(fb() if callable(fb) else fb)


def _trie_order(vocab):
    order = vocab.trie.order
    return _as_numpy(order() if callable(order) else order)


def _map_array(amap, name: str):
    a = getattr(amap, name)
    return _as_numpy(a() if callable(a) else a)


def _student_size(amap) -> int:
    n = getattr(amap, "n_student", None)
    return int(n) if n is not None else len(amap.student)


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
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
    from . import ops, reference

    return ops, reference


def _on_reference(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with ctalign.ops forced onto its pure-torch path (``ctalign.reference``)."""
    from . import ops

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

    from . import reference

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
        from .losses import uld_loss
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


# --------------------------------------------------------------------------------------------
# measuring a case
# --------------------------------------------------------------------------------------------
# An op output disagrees with its reference when, on entries with probability >= SIGNIFICANT_P, the
# log-probabilities differ by more than LOG_TOL, or any probability differs by more than PROB_TOL, or
# an entry is finite on one side only. (Log-space errors of vanishing masses alone say little.)
SIGNIFICANT_P = 1e-6
LOG_TOL = 1e-4
PROB_TOL = 1e-5


def compare_outputs(out, ref) -> dict:
    """Agreement of an op's log-probability output with the reference's (see the tolerances above)."""
    import torch

    if hasattr(out, "logprobs") and hasattr(ref, "logprobs"):  # sparse outputs (TopK): the same ids, then values
        if out.indices.shape != ref.indices.shape or not torch.equal(out.indices.cpu(), ref.indices.cpu()):
            return {"check_error": "sparse outputs list different ids"}
        out, ref = out.logprobs, ref.logprobs
    elif hasattr(out, "logprobs") and hasattr(ref, "shape"):  # a sparse output against a dense one: scatter it
        out = torch.full_like(ref, float("-inf")).scatter(-1, out.indices.to(ref.device), out.logprobs.to(ref.dtype))
    if out is None or ref is None or not hasattr(out, "shape") or out.shape != ref.shape:
        return {"check_error": "shapes differ" if hasattr(out, "shape") else "no output"}
    a = out.detach().double()
    b = ref.detach().double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    both = fa & fb
    res = {"finite_mismatch": int((fa ^ fb).sum()), "max_abs_err": 0.0, "max_abs_err_significant": 0.0,
           "max_prob_err": float((a.exp() - b.exp()).abs().max()) if a.numel() else 0.0}
    if bool(both.any()):
        d = (a - b).abs()
        res["max_abs_err"] = float(d[both].max())
        sig = both & (b >= math.log(SIGNIFICANT_P))
        if bool(sig.any()):
            res["max_abs_err_significant"] = float(d[sig].max())
    res["agrees"] = bool(res["finite_mismatch"] == 0 and res["max_abs_err_significant"] <= LOG_TOL
                         and res["max_prob_err"] <= PROB_TOL)
    return res


def run_case(ws: Workspace, case: Case, opts: "Options") -> dict:
    """Measure one case and its baselines; returns the JSON record."""
    import torch

    rec: dict[str, Any] = {"section": case.section, "op": case.op, "pair": case.pair, "teacher": case.teacher,
                           "student": case.student if case.op not in _BYTE_OPS else None,
                           "dtype": case.dtype, "rows": case.rows, "k": case.k, "device": case.device,
                           "threads": case.threads, "note": case.note}
    cuda = case.device.startswith("cuda")
    old_threads = torch.get_num_threads()
    if case.threads and not cuda:
        torch.set_num_threads(case.threads)
    rec["threads"] = None if cuda else torch.get_num_threads()
    budget = opts.mem_budget_cuda if cuda else opts.mem_budget
    t_case = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    try:
        try:
            p = prepare(ws, case, dense_budget=opts.dense_budget, mem_budget=budget)
        except Unavailable as e:
            rec["skipped"] = str(e)
            return rec
        except (ImportError, AttributeError, NotImplementedError) as e:
            rec["skipped"] = f"{type(e).__name__}: {e}"
            return rec
        vt = ws.vocab(case.teacher)
        rec["V_teacher"] = len(vt)
        rec["width"] = int(p.logits.shape[-1]) if case.op not in _TOPK_OPS else _padded(len(vt))
        if case.student and case.op not in _BYTE_OPS:
            rec["V_student"] = len(ws.vocab(case.student))
        rec["queries"] = p.queries
        rec["bytes_read"] = p.bytes_read
        rec["out_cols"] = _out_cols(case.op, rec.get("V_student"), case.k)  # cover_topk_sparse: set from its output
        t = dict(cuda=cuda, target_s=opts.target_s, min_reps=opts.min_reps)

        ops, _ = _api()
        try:
            out, first = call_timed(p.run, cuda=cuda)  # also the warm-up of the timing below
        except Exception as e:  # noqa: BLE001 - a broken op is reported, the run goes on
            rec["skipped"] = f"op failed: {type(e).__name__}: {e}"
            return rec
        if case.op == "cover_topk_sparse":
            rec["out_cols"] = int(out.indices.shape[-1])
        rec["backend"] = "torch (losses)" if case.op == "uld" else _last_backend(ops)
        if rec["backend"] == "cuda":
            try:
                from . import _cuda_backend

                rec["kernel"] = getattr(_cuda_backend, "last_kernel", None)
            except ImportError:
                pass
        tm = measure(p.run, first_s=first, **t)
        rec.update(tm.as_dict())
        rec["gbps"] = p.bytes_read / tm.median / 1e9
        rec["positions_per_s"] = case.rows / tm.median

        # memory of the pure-torch formulations, as measured for ctalign.reference: ~5 float32 copies
        # of the logits (scaled copy, softmax, float64 sums, index) and ~5 float64 copies of the output
        out_cols = rec.get("out_cols", 0)
        torch_need = (case.rows * (rec["V_teacher"] * 20 + out_cols * 40) + p.bytes_read
                      if case.op not in _TOPK_OPS else 0)
        torch_fits = torch_need <= budget
        checked = False

        def check_against(ref_out) -> None:
            nonlocal checked
            checked = True
            try:
                rec.update(compare_outputs(out, ref_out))
            except Exception as e:  # noqa: BLE001 - reporting only
                rec["check_error"] = f"{type(e).__name__}: {e}"

        base: dict[str, dict] = {}
        if "roofline" in case.baselines:
            x = p.logits
            rt = measure(lambda: torch.sum(x, -1), **t)
            base["roofline"] = {**rt.as_dict(), "gbps": x.numel() * x.element_size() / rt.median / 1e9}
            if case.op not in _TOPK_OPS and isinstance(out, torch.Tensor) and out.dim() >= 2:
                # writing the op's output once, at torch's speed: with the read above, the I/O bound
                sink = torch.empty_like(out)
                wt = measure(lambda: sink.fill_(0.0), **t)
                base["write"] = {**wt.as_dict(), "bytes": sink.numel() * sink.element_size()}
                del sink
        if "softmax" in case.baselines and p.softmax is not None:
            base["softmax"] = measure(p.softmax, **t).as_dict()
        if "torch" in case.baselines and not torch_fits:
            base["torch"] = {"skipped": f"needs ~{torch_need / GiB:.1f} GiB (float32 softmax + float64 sums) "
                                        f"> budget {budget / GiB:.1f} GiB", "memory_bytes": torch_need}
        elif "torch" in case.baselines:
            variants = {}
            names = list(p.torch_variants)
            if case.section != "ops" and not opts.all_torch_variants:
                names = names[:1]  # scaling curves: the first formulation (ctalign.reference where it applies)
            for name in names:
                fn = p.torch_variants[name]
                try:
                    ref_out, first_v = call_timed(fn, cuda=cuda)
                    if fn is p.check and opts.check:
                        check_against(ref_out)
                    del ref_out
                    variants[name] = measure(fn, first_s=first_v, **t).as_dict()
                except Exception as e:  # noqa: BLE001
                    variants[name] = {"error": f"{type(e).__name__}: {e}"}
            timed = {n: v for n, v in variants.items() if "time_s" in v}
            if timed:
                best = min(timed, key=lambda n: timed[n]["time_s"])
                base["torch"] = {**timed[best], "formulation": best, "variants": variants}
            elif variants:
                base["torch"] = {"skipped": "; ".join(f"{n}: {v['error']}" for n, v in variants.items()),
                                 "variants": variants}
        if p.check is not None and opts.check and not checked:
            if not torch_fits:
                rec["check_error"] = "skipped: the reference does not fit the memory budget"
            else:
                try:
                    check_against(p.check())
                except Exception as e:  # noqa: BLE001
                    rec["check_error"] = f"{type(e).__name__}: {e}"
        out = None  # free the output before the dense baseline
        if "dense" in case.baselines:
            memo_key = (case.op, case.pair, case.dtype, case.rows, case.device, rec["threads"])
            if case.op in _TOPK_OPS and memo_key in opts.dense_path_memo:
                base["dense"] = dict(opts.dense_path_memo[memo_key])  # the dense path does not depend on k
            elif p.dense is not None:
                try:
                    setup = getattr(p.dense, "setup", None)
                    if setup is not None:
                        setup()  # build the dense matrix outside the timing
                    base["dense"] = {**measure(p.dense, **t).as_dict(), "memory_bytes": p.dense_bytes,
                                     "note": p.dense_note}
                    if case.op in _TOPK_OPS:
                        opts.dense_path_memo[memo_key] = dict(base["dense"])
                except (RuntimeError, MemoryError) as e:
                    base["dense"] = {"skipped": f"{type(e).__name__}: {e}", "memory_bytes": p.dense_bytes}
            else:
                base["dense"] = {"skipped": p.dense_note or "n/a", "memory_bytes": p.dense_bytes}
        for v in base.values():
            if "time_s" in v:
                v["ratio"] = v["time_s"] / tm.median  # > 1: the op is that many times faster
        rec["baselines"] = base
        if "roofline" in base:
            rec["roofline_ratio"] = base["roofline"]["time_s"] / tm.median
        if "write" in base:
            read_s = base["roofline"]["time_s"]
            rec["io_bound_ratio"] = read_s / (read_s + base["write"]["time_s"])
        return rec
    finally:
        rec["wall_s"] = time.perf_counter() - t_case
        if cuda:
            rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / MiB
            torch.cuda.reset_peak_memory_stats()
        else:
            hwm = _rss_kb("VmHWM")
            if hwm is not None:
                rec["peak_rss_mb"] = hwm / 1024
        if case.threads and not cuda:
            torch.set_num_threads(old_threads)
        if cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# build-map timings (each pair in its own process, so peak memory is the build's own)
# --------------------------------------------------------------------------------------------
def _rss_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so it records the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_map_worker(teacher: str, student: str, repeats: int, with_tracemalloc: bool) -> dict:
    """Runs in a child process: parse both vocabularies, build the map (timed, peak RSS), rebuild
    ``repeats`` times, save and load the artifact, and optionally a tracemalloc'd build."""
    import resource

    from .alignment_map import AlignmentMap, build_map, prepare_for_mapping

    def parse(name, side):
        v = load_bench_vocab(name)
        prepare_for_mapping(v, side)  # what build_map counts as parsing
        return v

    res: dict[str, Any] = {"teacher": teacher, "student": student}
    t0 = time.perf_counter()
    vt = parse(teacher, "teacher")
    res["parse_teacher_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vs = parse(student, "student")
    res["parse_student_s"] = time.perf_counter() - t0
    res["V_teacher"], res["V_student"] = len(vt), len(vs)
    gc.collect()
    reset = _reset_peak_rss()
    rss0 = _rss_kb("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    amap = build_map(vt, vs)
    res["build_s"] = time.perf_counter() - t0
    if reset and rss0 is not None:
        res["peak_rss_delta_mb"] = (_rss_kb("VmHWM") - rss0) / 1024
        res["peak_rss_method"] = "VmHWM reset"
    else:
        res["peak_rss_delta_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024
        res["peak_rss_method"] = "ru_maxrss delta (lower bound)"
    res["rss_before_mb"] = (rss0 or 0) / 1024
    res["regime"] = str(amap.regime)
    try:  # the map's own breakdown: tables, encode_raw (dec_S), core
        res["steps_s"] = {k: v for k, v in amap.report().get("timings", {}).items() if not k.startswith("parse")}
    except Exception:  # noqa: BLE001 - reporting only
        pass
    rebuilds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        build_map(vt, vs)
        rebuilds.append(time.perf_counter() - t0)
    if rebuilds:
        res["rebuild_s"] = statistics.median(rebuilds)
    with tempfile.TemporaryDirectory(prefix="ctalign-bench-") as tmp:
        path = Path(tmp) / "pair.ctmap"
        t0 = time.perf_counter()
        amap.save(path)
        res["save_s"] = time.perf_counter() - t0
        res["artifact_mb"] = path.stat().st_size / MiB
        t0 = time.perf_counter()
        try:
            AlignmentMap.load(path, teacher=vt, student=vs)
        except TypeError:
            AlignmentMap.load(path)
        res["load_s"] = time.perf_counter() - t0
    if with_tracemalloc:
        import tracemalloc

        del amap
        gc.collect()
        tracemalloc.start()
        build_map(vt, vs)
        res["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / MiB
        tracemalloc.stop()
    return res


def run_build_map(teacher: str, student: str, quick: bool) -> dict:
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "ctalign.bench", "--build-map-worker", teacher, student,
           "--repeats", "0" if quick else "2"] + ([] if quick else ["--tracemalloc"])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    rec = {"section": "build_map", "teacher": teacher, "student": student, "pair": f"{teacher}:{student}"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        rec["skipped"] = "worker failed: " + " | ".join(tail)
        return rec
    rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    rec["process_wall_s"] = wall
    return rec


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_ratio(v: dict | None) -> str:
    if not v:
        return "-"
    if "ratio" in v:
        r = v["ratio"]
        return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"
    if "skipped" in v:
        mem = v.get("memory_bytes")
        if mem and "needs" in v["skipped"]:
            return f"needs {mem / GiB:.1f}G"
        return "n/a" if v["skipped"].startswith("n/a") else "skip"
    return "-"


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_table(records: list[dict]) -> str:
    """The op table: one line per record (see docs/benchmarks.md for the columns)."""
    head = ["op", "pair", "dtype", "dev", "thr", "rows", "k", "time (IQR)", "GB/s", "pos/s", "roofline",
            "I/O bound", "vs torch", "vs dense", "vs softmax", "backend"]
    lines = []
    for r in records:
        if "skipped" in r:
            lines.append([r["op"], r["pair"], r["dtype"], r["device"], str(r.get("threads") or "-"), str(r["rows"]),
                          str(r["k"] or "-"), "skipped: " + r["skipped"][:60], "", "", "", "", "", "", "", ""])
            continue
        b = r.get("baselines", {})
        iqr = (r["q3_s"] - r["q1_s"]) / r["time_s"] * 100 if r["time_s"] else 0
        torch_b = b.get("torch")
        vs_torch = _fmt_ratio(torch_b)
        if torch_b and "formulation" in torch_b:
            vs_torch += f" ({torch_b['formulation']})"
        lines.append([r["op"], r["pair"], r["dtype"], r["device"], str(r.get("threads") or "-"), str(r["rows"]),
                      str(r["k"] or "-"), f"{_fmt_time(r['time_s'])} ±{iqr:.0f}%", f"{r['gbps']:.1f}",
                      _fmt_rate(r["positions_per_s"]),
                      f"{r['roofline_ratio']:.2f}" if "roofline_ratio" in r else "-",
                      f"{r['io_bound_ratio']:.2f}" if "io_bound_ratio" in r else "-",
                      vs_torch, _fmt_ratio(b.get("dense")), _fmt_ratio(b.get("softmax")), r.get("backend") or "?"])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    return "\n".join(out)


def format_build_table(records: list[dict]) -> str:
    head = ["pair", "V_teacher", "V_student", "regime", "parse t+s", "build", "rebuild", "peak RSS", "py peak",
            "artifact", "load"]
    lines = []
    for r in records:
        if "skipped" in r:
            lines.append([r["pair"], "skipped: " + r["skipped"][:80]] + [""] * 9)
            continue
        lines.append([r["pair"], f"{r['V_teacher']:,}", f"{r['V_student']:,}", r["regime"],
                      f"{r['parse_teacher_s']:.2f}+{r['parse_student_s']:.2f} s", _fmt_time(r["build_s"]),
                      _fmt_time(r.get("rebuild_s")), f"{r['peak_rss_delta_mb']:.0f} MB",
                      f"{r['python_peak_mb']:.0f} MB" if "python_peak_mb" in r else "-",
                      f"{r['artifact_mb']:.1f} MB", _fmt_time(r.get("load_s"))])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    return "\n".join(out)


def machine_info(devices: list[str]) -> dict:
    import torch

    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "devices": devices}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    if any(d.startswith("cuda") for d in devices):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
    try:
        from . import __version__

        info["ctalign"] = __version__
    except ImportError:
        pass
    try:
        from . import _cpu_backend

        info["kernel_isa"] = _cpu_backend.kernel_isa() if _cpu_backend.available() else None
    except Exception:  # noqa: BLE001 - reporting only
        info["kernel_isa"] = None
    for mod in ("_cpu_backend", "_cuda_backend"):
        try:
            m = __import__(f"ctalign.{mod}", fromlist=["available"])
            info[mod.strip("_")] = bool(m.available())
        except Exception:  # noqa: BLE001 - reporting only
            info[mod.strip("_")] = False
    return info


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _torch_gbps(r: dict) -> float | None:
    t = r["baselines"].get("torch", {})
    return r["bytes_read"] / t["time_s"] / 1e9 if "time_s" in t else None


def plot(result: dict, path: str | os.PathLike) -> None:
    """Scaling curves (rows, vocabulary, k, threads), build-map, and the op table's speed-ups, in one
    PNG (matplotlib, Agg). Solid: ctalign; dashed: the roofline (torch.sum over the same logits);
    dotted: the pure-torch formulation. Each device has its own lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["results"] if "time_s" in r]
    devices = sorted({r["device"] for r in recs})
    m = result["machine"]
    title = f"ctalign bench - {m.get('cpu', '')} ({m.get('cpu_count')} cores)"
    if m.get("gpu"):
        title += f" + {m['gpu']}"
    title += f" - {m.get('date', '')[:10]}" + ("  [--quick: checks that it works, not speed]" if result.get("quick") else "")
    fig, axes = plt.subplots(2, 3, figsize=(18, 10.5))
    fig.suptitle(title, fontsize=11)

    def groups(section: str, key=lambda r: (r["device"], r["op"], r["pair"], r["dtype"])):
        out: dict[tuple, list[dict]] = {}
        for r in recs:
            if r["section"] == section:
                out.setdefault(key(r), []).append(r)
        return out

    def label(dev, *parts):
        return " ".join(p for p in parts if p) + (f" [{dev}]" if len(devices) > 1 or dev != "cpu" else "")

    def finish(ax, title, xlabel, ylabel, drew, xlog=True, ylog=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if drew:
            if xlog:
                ax.set_xscale("log", base=2)
            if ylog:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)

    def bandwidth_lines(ax, section, xkey):
        drew = False
        for i, ((dev, op, pair, dt), rs) in enumerate(sorted(groups(section).items())):
            rs = sorted(rs, key=lambda r: r[xkey] or 0)
            xs = [r[xkey] for r in rs]
            c = f"C{i}"
            ax.plot(xs, [r["gbps"] for r in rs], "o-", color=c, label=label(dev, op, pair))
            roof = [r["baselines"].get("roofline", {}).get("gbps") for r in rs]
            if any(v is not None for v in roof):
                ax.plot(xs, roof, "--", color=c, alpha=0.6)
            tg = [_torch_gbps(r) for r in rs]
            if any(v is not None for v in tg):
                ax.plot(xs, tg, ":", color=c, alpha=0.8)
            drew = True
        return drew

    ax = axes[0, 0]
    finish(ax, "rows (dashed: roofline, dotted: pure torch)", "rows (positions)", "GB/s of logits read",
           bandwidth_lines(ax, "rows", "rows"))

    ax = axes[0, 1]
    drew = False
    for i, ((dev, op), rs) in enumerate(sorted(groups("vocab", key=lambda r: (r["device"], r["op"])).items())):
        rs = sorted(rs, key=lambda r: r["V_teacher"])
        xs = [r["V_teacher"] for r in rs]
        c = f"C{i}"
        ax.plot(xs, [r["gbps"] for r in rs], "o-", color=c, label=label(dev, op))
        ax.plot(xs, [r["baselines"].get("roofline", {}).get("gbps") for r in rs], "--", color=c, alpha=0.6)
        ax.plot(xs, [_torch_gbps(r) for r in rs], ":", color=c, alpha=0.8)
        for r in rs:
            if r["teacher"] == SYNTHETIC_VOCAB:
                ax.annotate("262k (synthetic)", (r["V_teacher"], r["gbps"]), fontsize=7)
        drew = True
    finish(ax, "teacher vocabulary (rows fixed)", "teacher vocabulary size", "GB/s of logits read", drew)

    ax = axes[0, 2]
    drew = False
    for i, ((dev, op, pair, dt), rs) in enumerate(sorted(groups("k").items())):
        rs = sorted(rs, key=lambda r: r["k"])
        xs = [r["k"] for r in rs]
        c = f"C{i}"
        ax.plot(xs, [r["time_s"] * 1e3 for r in rs], "o-", color=c, label=label(dev, op, pair))
        ax.plot(xs, [r["baselines"].get("dense", {}).get("time_s", float("nan")) * 1e3 for r in rs], "--", color=c,
                alpha=0.6)
        ax.plot(xs, [r["baselines"].get("torch", {}).get("time_s", float("nan")) * 1e3 for r in rs], ":", color=c,
                alpha=0.8)
        drew = True
    finish(ax, "top-k rows (dashed: the op on full logits)", "k", "ms per call", drew)

    ax = axes[1, 0]
    finish(ax, "threads (CPU)", "threads", "GB/s of logits read", bandwidth_lines(ax, "threads", "threads"),
           xlog=False)
    ax.xaxis.get_major_locator().set_params(integer=True)

    ax = axes[1, 1]
    bm = sorted((r for r in result.get("build_map", []) if "build_s" in r), key=lambda r: r["V_teacher"])
    if bm:
        xs = [r["V_teacher"] + r["V_student"] for r in bm]
        ax.plot(xs, [r["build_s"] for r in bm], "o", color="C0", label="build (s, left)")
        for r, x in zip(bm, xs):
            ax.annotate(r["pair"], (x, r["build_s"]), fontsize=7)
        ax2 = ax.twinx()
        ax2.plot(xs, [r["peak_rss_delta_mb"] for r in bm], "s", color="C1", label="peak RSS (MB, right)")
        ax2.set_ylabel("peak RSS of the build (MB)")
        ax2.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="lower right", fontsize=7)
        ax.grid(True, alpha=0.3)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("build-map (each pair in its own process)")
    ax.set_xlabel("V_teacher + V_student")
    ax.set_ylabel("build time (s), parsing excluded")

    ax = axes[1, 2]
    table = [r for r in recs if r["section"] == "ops"]
    if table:
        names = [f"{r['op']} {r['pair']} {r['dtype']}" + (f" [{r['device']}]" if len(devices) > 1 or r["device"] != "cpu" else "")
                 for r in table]
        y = list(range(len(table)))
        vs_torch = [r["baselines"].get("torch", {}).get("ratio", float("nan")) for r in table]
        roof = [r.get("roofline_ratio", float("nan")) for r in table]
        ax.barh([v - 0.2 for v in y], vs_torch, height=0.4, color="C0", label="speed-up over pure torch")
        ax.barh([v + 0.2 for v in y], roof, height=0.4, color="C2", label="share of the roofline")
        bound = [(v + 0.2, r["io_bound_ratio"]) for v, r in zip(y, table) if "io_bound_ratio" in r]
        if bound:
            ax.scatter([b for _, b in bound], [v for v, _ in bound], marker="|", s=60, color="k", zorder=3,
                       label="I/O bound (read logits + write output)")
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(left=1e-2)
        for x, style in ((1, "-"), (0.5, ":"), (5, "--")):
            ax.axvline(x, color="gray", linestyle=style, linewidth=0.8)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("op table (lines at 0.5x roofline, 1x, 5x torch; ticks: I/O bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctalign bench",
        description="Time the alignment ops against the roofline (torch.sum over the same logits), the fastest "
                    "pure-torch formulation, the dense mapping-matrix approach and torch.softmax, measured in one "
                    "run on the same tensors; build-map timings and peak memory; scaling curves.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: checks that everything works (not speed), ~1 minute")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--plot", metavar="PATH", help="write the scaling curves as a PNG")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                   help="cpu, cuda, or all (cpu and cuda); auto (default): cpu, plus cuda when a GPU is present")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads for the CPU runs (default: torch's)")
    p.add_argument("--ops", nargs="+", choices=list(OPS), metavar="OP",
                   help=f"ops to time (default all): {', '.join(OPS)}")
    p.add_argument("--pairs", nargs="+", type=_parse_pair, metavar="TEACHER:STUDENT",
                   help=f"vocabulary pairs of the op table; names: {', '.join(list(VOCABS) + [SYNTHETIC_VOCAB])}")
    p.add_argument("--sections", nargs="+", default=["ops", "rows", "vocab", "k", "threads", "build_map"],
                   choices=["ops", "rows", "vocab", "k", "threads", "build_map"],
                   help="what to run (default: all)")
    p.add_argument("--dtypes", nargs="+", choices=list(_DTYPES), help="logits dtypes of the op table (default fp32, "
                   "plus bf16 for next_byte and project at the first pair)")
    p.add_argument("--rows", type=int, help="rows (positions) of the op table (default 256 on CPU, 4096 on GPU)")
    p.add_argument("--k", type=int, help="k of the top-k ops in the op table (default 64)")
    p.add_argument("--time-per-measure", type=float, metavar="S",
                   help="seconds of repeats per measurement (default 0.4; quick 0.02)")
    p.add_argument("--dense-budget-gib", type=float, default=None,
                   help="largest dense mapping matrix to build (default 8; quick 1)")
    p.add_argument("--mem-budget-gib", type=float, default=8.0,
                   help="largest logits + output of a CPU case (default 8)")
    p.add_argument("--all-torch-variants", action="store_true",
                   help="time every pure-torch formulation in the scaling sections too (default: ops table only)")
    p.add_argument("--no-check", action="store_true", help="skip comparing each op's output with ctalign.reference")
    p.add_argument("--list", action="store_true", help="print the measurements the options select, and exit")
    p.add_argument("--build-map-worker", nargs=2, metavar=("TEACHER", "STUDENT"), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark described by parsed ``args``; returns the JSON-able result."""
    import torch

    # torch's sparse CSR tensors (one pure-torch baseline) warn that they are beta, on every build
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    cuda_ok = torch.cuda.is_available()
    if args.device == "cpu":
        devices = ["cpu"]
    elif args.device == "cuda":
        if not cuda_ok:
            raise SystemExit("ctalign bench: --device cuda but torch sees no CUDA device")
        devices = ["cuda"]
    elif args.device == "all":
        devices = ["cpu"] + (["cuda"] if cuda_ok else [])
    else:
        devices = ["cpu"] + (["cuda"] if cuda_ok else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = Options(quick=args.quick)
    opts.target_s = args.time_per_measure if args.time_per_measure is not None else (0.02 if args.quick else 0.4)
    opts.min_reps = 1 if args.quick else 3
    opts.dense_budget = int((args.dense_budget_gib if args.dense_budget_gib is not None else (1 if args.quick else 8)) * GiB)
    opts.mem_budget = int(args.mem_budget_gib * GiB)
    if cuda_ok and "cuda" in devices:
        opts.mem_budget_cuda = int(0.3 * torch.cuda.get_device_properties(0).total_memory)
    opts.check = not args.no_check
    opts.all_torch_variants = args.all_torch_variants

    result: dict[str, Any] = {"machine": machine_info(devices), "quick": bool(args.quick),
                              "command": "ctalign bench " + " ".join(getattr(args, "_argv", [])),
                              "results": [], "build_map": []}
    if not cuda_ok and args.device in ("all", "auto"):
        result["machine"]["gpu"] = None
        log("no CUDA device: CPU only")
    ws = Workspace(log)
    cases = plan(args, devices)
    if getattr(args, "list", False):
        for c in cases:
            log(f"{c.section:8s} {c.op:16s} {c.pair:22s} {c.dtype} {c.device} rows={c.rows} k={c.k} threads={c.threads}")
        if "build_map" in args.sections:
            for t, s in build_map_pairs(args):
                log(f"build_map {t}:{s}")
        result["listed"] = len(cases)
        return result
    log(f"ctalign bench: {len(cases)} measurements on {', '.join(devices)}"
        f" ({result['machine']['cpu']}, {result['machine']['cpu_count']} cores, torch {torch.__version__})")
    t_start = time.perf_counter()
    last_section = None
    for case in cases:
        if case.section != last_section:
            log(f"[{case.section}]")
            last_section = case.section
        try:
            rec = run_case(ws, case, opts)
        except Exception as e:  # noqa: BLE001 - one broken case (a baseline out of memory...) is reported
            rec = {"section": case.section, "op": case.op, "pair": case.pair, "teacher": case.teacher,
                   "student": case.student, "dtype": case.dtype, "rows": case.rows, "k": case.k,
                   "device": case.device, "threads": case.threads, "skipped": f"error: {type(e).__name__}: {e}"}
            ws.release_logits()
        result["results"].append(rec)
        if "skipped" in rec:
            log(f"  {case.op:16s} {case.pair:22s} {case.dtype} rows={case.rows} k={case.k}: skipped ({rec['skipped']})")
        else:
            log(f"  {case.op:16s} {case.pair:22s} {case.dtype} {case.device} rows={case.rows:<6d} k={case.k or '-':<5} "
                f"thr={rec.get('threads') or '-'}: {_fmt_time(rec['time_s'])}  {rec['gbps']:.1f} GB/s  "
                f"roofline {rec.get('roofline_ratio', float('nan')):.2f}")
        # dense mapping matrices (up to the dense budget each) never outlive their case
        ws.drop_tables(lambda k: k[-2] in ("dense", "cover_dense"))
    ws.release_logits()
    if "build_map" in args.sections:
        log("[build_map] each pair in its own process")
        for t, s in build_map_pairs(args):
            rec = run_build_map(t, s, args.quick)
            result["build_map"].append(rec)
            if "skipped" in rec:
                log(f"  {t} -> {s}: skipped ({rec['skipped']})")
            else:
                log(f"  {t} -> {s}: build {_fmt_time(rec['build_s'])}, peak {rec['peak_rss_delta_mb']:.0f} MB, {rec['regime']}")
    result["elapsed_s"] = time.perf_counter() - t_start
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ctalign bench`` (the CLI forwards its arguments here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args._argv = argv
    if args.build_map_worker:
        res = build_map_worker(*args.build_map_worker, repeats=args.repeats, with_tracemalloc=args.tracemalloc)
        print(json.dumps(res))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("ctalign bench: needs torch (pip install torch)", file=sys.stderr)
        return 2
    result = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.list:
        return 0
    ops_recs = [r for r in result["results"] if r["section"] == "ops"]
    print(f"\nctalign bench, {result['machine']['date']}, {result['machine']['cpu']} "
          f"({result['machine']['cpu_count']} cores), torch {result['machine']['torch']}"
          + (f", {result['machine']['gpu']}" if result['machine'].get('gpu') else "")
          + ("  [--quick: checks that everything runs; the numbers are not meant as speed]" if args.quick else ""))
    if ops_recs:
        print("\nOps (time = median; ratios > 1: ctalign is that many times faster; roofline = share of "
              "torch.sum's read bandwidth)")
        print(format_table(ops_recs))
    for section in ("rows", "vocab", "k", "threads"):
        recs = [r for r in result["results"] if r["section"] == section]
        if recs:
            print(f"\nScaling: {section}")
            print(format_table(recs))
    if any(r["teacher"] == SYNTHETIC_VOCAB for r in result["results"] + result["build_map"]):
        print(f"\n{SYNTHETIC_VOCAB}: no public 262k tokenizer is among the assets; this teacher is the union of the "
              f"token byte strings of {', '.join(_UNION_SOURCES)}, cut to {SYNTHETIC_SIZE:,} tokens.")
    if result["build_map"]:
        print("\nbuild-map (each pair in its own process; parse = loading both tokenizers; build excludes parsing; "
              "peak RSS = the build's own high-water mark)")
        print(format_build_table(result["build_map"]))
    bad = [r for r in result["results"] if r.get("agrees") is False]
    if bad:
        print(f"\nWARNING: {len(bad)} measurement(s) whose output disagrees with the pure-torch reference "
              f"(|log p err| > {LOG_TOL:g} where p >= {SIGNIFICANT_P:g}, |p err| > {PROB_TOL:g}, or -inf patterns "
              f"differ):")
        for r in bad:
            print(f"  {r['op']} {r['pair']} {r['dtype']} {r['device']} rows={r['rows']}: log err "
                  f"{r['max_abs_err_significant']:.2g} (all finite: {r['max_abs_err']:.2g}), p err "
                  f"{r['max_prob_err']:.2g}, finite mismatches {r['finite_mismatch']}"
                  + (f", kernel {r['kernel']}" if r.get("kernel") else ""))
    per_section: dict[str, float] = {}
    for r in result["results"]:
        per_section[r["section"]] = per_section.get(r["section"], 0.0) + r.get("wall_s", 0.0)
    per_section["build_map"] = sum(r.get("process_wall_s", 0.0) for r in result["build_map"])
    peak = max((r.get("peak_rss_mb", 0) for r in result["results"]), default=0)
    print(f"\n{len(result['results'])} measurements in {result['elapsed_s']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in per_section.items() if v) + f"); peak RSS {peak / 1024:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
