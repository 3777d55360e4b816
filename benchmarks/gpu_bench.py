#!/usr/bin/env python3
"""GPU benchmark of the ctalign CUDA kernels on real vocabularies, with the roofline and the
pure-torch path measured in the same run.

For each problem (op x vocabulary x dtype x rows) it times, with CUDA events (median of repeats,
after warm-up), on the same logits tensor:

- the CUDA kernel (``ctalign.ops._cuda_backend``, one entry per kernel variant asked for);
- the roofline: ``torch.sum(logits, -1)``, which reads the logits once;
- the fastest pure-torch formulation (``ctalign.reference`` with float32 and float64 accumulation,
  and a softmax + ``index_add_`` / ``cumsum`` formulation).

It prints a table and writes JSON rows: op, vocab, dtype, rows, variant, backend, time_ms,
gbps (bytes of logits read / time), roofline_ms, pct_roofline (roofline time / kernel time),
torch_ms, x_torch (torch time / kernel time), and bytes_out.

    CTALIGN_CACHE=... PYTHONPATH=python python3 benchmarks/gpu_bench.py --json out.json
    ... --rows 4096 --dtypes float32,bfloat16 --quick
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from ctalign.ops import _cuda_backend as cb
from ctalign import assets, ops, reference


def cuda_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of fn() over `reps` runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def with_options(**kw):
    def wrap(fn):
        def run():
            saved = dict(cb.options)
            cb.options.update(kw)
            try:
                return fn()
            finally:
                cb.options.clear()
                cb.options.update(saved)
        return run
    return wrap


# ---- problems -----------------------------------------------------------------------------------
def load(name):
    from ctalign.vocab import load_vocab
    return load_vocab(assets.path(name), name=name)


def synthetic_262k(qwen, llama):
    """A 262,144-token byte vocabulary: Qwen's tokens followed by Llama-3's first 110,293 (real token
    strings; duplicates keep distinct ids)."""
    from ctalign import _core
    qo, qd, qh = qwen.byte_table()
    lo, ld, lh = llama.byte_table()
    n = 262144 - len(qwen)
    offs = np.concatenate([qo[:-1], qo[-1] + lo[:n + 1]])
    data = np.concatenate([qd, ld[:lo[n]]]).astype(np.int32)
    member = np.concatenate([qh, lh[:n]])
    trie = _core.SequenceTrie(offs, data, member, 256)
    return trie, ops._trie_tables(ops._trie_fields_of(trie), 256)


def student_cover(trie, tables, student):
    """[1, C] ranges in `trie`'s order of the tokens starting with each student token's bytes."""
    node_lo, node_hi = tables.host["node_lo"].numpy(), tables.host["node_hi"].numpy()
    lo = np.zeros(len(student), np.int32)
    hi = np.zeros(len(student), np.int32)
    for s in range(len(student)):
        b = student.token_bytes(s)
        if not b:
            continue
        node = trie.lookup(b)
        if node >= 0:
            lo[s], hi[s] = node_lo[node], node_hi[node]
    return torch.from_numpy(lo).view(1, -1), torch.from_numpy(hi).view(1, -1)


def prefix_queries(tab, n_rows, depths=2, seed=1):
    """Byte-conditional queries: for each row, the trie nodes of the first `depths` byte prefixes of
    a random token (depth-1 and depth-2 nodes, where they exist)."""
    h = {k: v.numpy() for k, v in tab.host.items()}
    rng = np.random.default_rng(seed)
    members = h["order"][rng.integers(0, tab.n_members, n_rows)]
    rows, nodes = [], []
    for r in range(n_rows):
        pos = h["rank"][members[r]]
        node = 0
        for _ in range(depths):
            kids = h["child_node"][h["child_start"][node]:h["child_start"][node + 1]]
            if len(kids) == 0:
                break
            k = int(np.searchsorted(h["node_lo"][kids], pos, side="right")) - 1
            if k < 0 or not (h["node_lo"][kids[k]] <= pos < h["node_hi"][kids[k]]):
                break
            node = int(kids[k])
            rows.append(r)
            nodes.append(node)
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(nodes, dtype=torch.int64)


def make_logits(rows, vocab, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    width = (vocab + 127) // 128 * 128  # padded like a model's output layer
    x = torch.randn(rows, width, generator=g, device=device, dtype=torch.float32) * 2.5
    x[:, :: 97] += 6.0  # a few likely tokens per row
    return x.to(dtype)


def torch_grouped(x, v, group, n_groups):
    """Pure-torch formulations of the grouped op; returns the fastest's callable list."""
    g64 = group[:v].long()

    def index_add():
        p = torch.softmax(x[:, :v].float(), dim=-1)
        mass = torch.zeros(x.shape[0], n_groups, device=x.device).index_add_(1, g64, p)
        return reference.safe_log(mass)
    return {
        "reference-f32": lambda: reference.grouped_logmass(x, v, group, n_groups, 1.0, accumulate=torch.float32),
        "reference-f64": lambda: reference.grouped_logmass(x, v, group, n_groups, 1.0),
        "index_add": index_add,
    }


def torch_range(x, v, order, rows, lo, hi):
    o64 = order.long()

    def prefix():
        p = torch.softmax(x[:, :v].float(), dim=-1)[:, o64]
        s = torch.nn.functional.pad(p.cumsum(-1), (1, 0))
        r = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        lo_ = lo.long().expand(r.shape[0], -1)
        hi_ = hi.long().expand(r.shape[0], -1)
        return reference.safe_log(s[r[:, None], hi_] - s[r[:, None], lo_])
    return {
        "reference-f32": lambda: reference.range_logmass(x, v, order, rows, lo, hi, 1.0, accumulate=torch.float32),
        "reference-f64": lambda: reference.range_logmass(x, v, order, rows, lo, hi, 1.0),
        "prefix_cumsum": prefix,
    }


def best_torch(variants, reps):
    best, name = float("inf"), None
    for k, fn in variants.items():
        try:
            t = cuda_time(fn, reps=reps, warmup=1)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        if t < best:
            best, name = t, k
    torch.cuda.empty_cache()
    return best, name


# ---- main ----------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer problems and variants")
    ap.add_argument("--no-torch", action="store_true", help="skip the pure-torch timings")
    args = ap.parse_args(argv)
    if not cb.available():
        print("gpu_bench: no CUDA device or ctalign._cuda missing", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    from ctalign import build_map

    t0 = time.time()
    qwen, llama, mistral = load("qwen"), load("llama3"), load("mistral-v1")
    trie262, tab262 = synthetic_262k(qwen, llama)
    maps = {
        ("qwen", "llama3"): build_map(qwen, llama),
        ("qwen", "mistral-v1"): build_map(qwen, mistral),
    }
    cover262 = student_cover(trie262, tab262, mistral)
    print(f"setup {time.time() - t0:.1f}s", flush=True)

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    results = []

    def record(op, vocab, dtype, rows, variant, fn, x, torch_ms, torch_name, roof_ms, bytes_out):
        try:
            ms = cuda_time(fn, reps=args.reps)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  {op} {vocab} {variant}: FAILED {type(e).__name__}: {e}", flush=True)
            return
        backend = cb.last_kernel
        nbytes = x.shape[0] * x.shape[1] * x.element_size()
        row = dict(op=op, vocab=vocab, dtype=str(dtype).replace("torch.", ""), rows=x.shape[0],
                   width=x.shape[1], variant=variant, backend=backend, time_ms=round(ms, 4),
                   gbps=round(nbytes / ms / 1e6, 1), roofline_ms=round(roof_ms, 4),
                   pct_roofline=round(100 * roof_ms / ms, 1), torch_ms=None if torch_ms is None else round(torch_ms, 3),
                   torch_impl=torch_name, x_torch=None if torch_ms is None else round(torch_ms / ms, 1),
                   bytes_out=bytes_out)
        results.append(row)
        print(f"  {op:16s} {vocab:10s} {row['dtype']:8s} {variant:14s} {ms:8.3f} ms {row['gbps']:7.0f} GB/s "
              f"{row['pct_roofline']:5.1f}% roof  x{row['x_torch']} torch ({torch_name})  [{backend}]", flush=True)

    problems = []
    byte_tabs = {"qwen": ops._byte_trie(qwen), "llama3": ops._byte_trie(llama), "synth262k": tab262}
    for name in (["qwen", "synth262k"] if args.quick else ["qwen", "llama3", "synth262k"]):
        problems.append(("next_byte", name, byte_tabs[name]))
    for dtype in dtypes:
        for op, name, tab in problems:
            v = tab.n_tokens
            x = make_logits(args.rows, v, dtype, dev)
            roof = cuda_time(lambda: torch.sum(x, -1), reps=args.reps)
            group = tab.on(dev)["group"]
            tt, tn = (None, None) if args.no_torch else best_torch(torch_grouped(x, v, group, 257), 3)
            variants = [("auto", {}), ("auto-again", {}), ("cluster", {"grouped_path": "cluster"})]
            if not args.quick:
                variants += [(f"v{k}", {"grouped_variant": k}) for k in (21, 41, 20)]
            for vname, opt in variants:
                fn = with_options(**opt)(lambda: cb.grouped_logmass(x, v, group, 257, 1.0))
                record(op, name, dtype, args.rows, vname, fn, x, tt, tn, roof, args.rows * 257 * 4)
            # backward
            out, lse = cb.grouped_logmass(x, v, group, 257, 1.0)
            gout = torch.randn_like(out)
            record("next_byte_bwd", name, dtype, args.rows, "auto",
                   lambda: cb.grouped_logmass_backward(x, v, group, 257, 1.0, out, lse, gout), x, None, None, roof,
                   x.shape[0] * x.shape[1] * 4)
            # byte conditionals: two queries per row (depth-1 and depth-2 prefixes of a random token)
            btab = tab.on(dev)
            rows_q, nodes_q = prefix_queries(tab, args.rows)
            rows_q, nodes_q = rows_q.to(dev), nodes_q.to(dev)
            lo, hi, _sym, _k = ops._child_ranges(btab, nodes_q, 257)
            order = btab["order"]
            tt2, tn2 = (None, None) if args.no_torch else best_torch(torch_range(x, v, order, rows_q, lo, hi), 3)
            for vname, opt in [("cluster", {"range": "cluster"})] + ([] if args.quick else [("direct", {"range": "direct"})]):
                fn = with_options(**opt)(lambda: cb.range_logmass(x, v, order, rows_q, lo, hi, 1.0))
                record("byte_cond", name, dtype, args.rows, vname, fn, x, tt2, tn2, roof, lo.numel() * 4)
            if name == "synth262k":
                clo, chi = cover262
                clo, chi = clo.to(dev), chi.to(dev)
                tt3, tn3 = (None, None) if args.no_torch else best_torch(torch_range(x, v, order, None, clo, chi), 3)
                for vname, opt in [("cluster", {"range": "cluster"}), ("cluster8", {"range": "cluster", "cluster_min": 8})]:
                    fn = with_options(**opt)(lambda: cb.range_logmass(x, v, order, None, clo, chi, 1.0))
                    record("cover", "262k>mistral", dtype, args.rows, vname, fn, x, tt3, tn3, roof,
                           args.rows * clo.shape[1] * 4)
            del x
            torch.cuda.empty_cache()

        # map ops: project_to_student (grouped, G = V_s + 1) and cover_logmass (range, C = V_s)
        for (t_name, s_name), amap in maps.items():
            mt, bt, _dec = ops._map_tables(amap)
            v = mt.n_teacher
            g = mt.n_student + 1
            x = make_logits(args.rows, v, dtype, dev)
            roof = cuda_time(lambda: torch.sum(x, -1), reps=args.reps)
            group = mt.on(dev)["group"]
            tt, tn = (None, None) if args.no_torch else best_torch(torch_grouped(x, v, group, g), 3)
            pair = f"{t_name}>{s_name}"
            variants = [("auto", {})]
            if g > cb._SMALL_GROUPS:
                variants = [("cluster", {"grouped_path": "cluster"}), ("bins", {"grouped_path": "bins"})]
            for vname, opt in variants:
                fn = with_options(**opt)(lambda: cb.grouped_logmass(x, v, group, g, 1.0))
                record("project", pair, dtype, args.rows, vname, fn, x, tt, tn, roof, args.rows * g * 4)
            out, lse = cb.grouped_logmass(x, v, group, g, 1.0)
            gout = torch.randn_like(out)
            record("project_bwd", pair, dtype, args.rows, "auto",
                   lambda: cb.grouped_logmass_backward(x, v, group, g, 1.0, out, lse, gout), x, None, None, roof,
                   x.shape[0] * x.shape[1] * 4)
            del out, gout
            tab = mt.on(dev)
            order = bt.on(dev)["order"]
            clo, chi = tab["cover_lo"], tab["cover_hi"]
            tt3, tn3 = (None, None) if args.no_torch else best_torch(torch_range(x, v, order, None, clo, chi), 3)
            for vname, opt in [("cluster", {"range": "cluster"})] + ([] if args.quick else [("cluster8", {"range": "cluster", "cluster_min": 8})]):
                fn = with_options(**opt)(lambda: cb.range_logmass(x, v, order, None, clo, chi, 1.0))
                record("cover", pair, dtype, args.rows, vname, fn, x, tt3, tn3, roof, args.rows * clo.shape[1] * 4)
            if dtype == dtypes[0]:
                out, lse = cb.range_logmass(x, v, order, None, clo, chi, 1.0)
                gout = torch.randn_like(out)
                record("cover_bwd", pair, dtype, args.rows, "direct",
                       lambda: cb.range_logmass_backward(x, v, order, None, clo, chi, 1.0, out, lse, gout), x,
                       None, None, roof, x.shape[0] * x.shape[1] * 4)
                del out, gout
            del x
            torch.cuda.empty_cache()

    print()
    print(f"{'op':14s} {'vocab':16s} {'dtype':9s} {'variant':9s} {'ms':>8s} {'GB/s':>6s} {'%roof':>6s} {'x torch':>8s}  backend")
    for r in results:
        print(f"{r['op']:14s} {r['vocab']:16s} {r['dtype']:9s} {r['variant']:9s} {r['time_ms']:8.3f} {r['gbps']:6.0f} "
              f"{r['pct_roofline']:6.1f} {str(r['x_torch']):>8s}  {r['backend']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
