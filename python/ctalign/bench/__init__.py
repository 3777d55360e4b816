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

Layout: ``config`` (vocabularies, ops, dtypes), ``timing``, ``workspace`` (what a run loads once),
``cases`` (one case's callables), ``compare`` (measuring a case), ``plans``, ``build_map_timing``,
``report``, ``plot``; the driver (``run``, ``main``) is here. ``import ctalign`` never imports it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from ctalign.bench.config import (GiB, VOCABS, SYNTHETIC_VOCAB, SYNTHETIC_SIZE, _UNION_SOURCES, OPS, _DTYPES)
from ctalign.bench.workspace import (_parse_pair, Workspace)
from ctalign.bench.compare import (SIGNIFICANT_P, LOG_TOL, PROB_TOL, run_case)
from ctalign.bench.plans import (Options, plan, build_map_pairs)
from ctalign.bench.build_map_timing import (build_map_worker, run_build_map)
from ctalign.bench.report import (_fmt_time, format_table, format_build_table, machine_info)
from ctalign.bench.plot import plot

# The harness's building blocks, for benchmarks/ and the tests.
from ctalign.bench.cases import Case, Prepared, Unavailable, _last_backend, prepare  # noqa: E402,F401
from ctalign.bench.compare import compare_outputs  # noqa: E402,F401
from ctalign.bench.timing import Timing, measure  # noqa: E402,F401
from ctalign.bench.workspace import load_bench_vocab  # noqa: E402,F401

__all__ = ["main", "run", "Timing", "measure", "VOCABS", "SYNTHETIC_VOCAB", "OPS"]


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
        write_plot(result, args.plot)
    return 0


PLOT_NEEDS = "plot not written: plots need matplotlib (pip install 'ctalign[bench]')"


def write_plot(result: dict, path) -> bool:
    """Write the PNG; without matplotlib say so in one line (the tables are already printed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(PLOT_NEEDS)
        return False
    plot(result, path)
    print(f"wrote {path}")
    return True
