"""Measuring one case: every callable timed, outputs compared with the reference, the ratios derived.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from ctalign.bench.config import (GiB, MiB, _BYTE_OPS, _TOPK_OPS)
from ctalign.bench.timing import (call_timed, measure, _rss_kb, _reset_peak_rss)
from ctalign.bench.workspace import (_padded, Workspace)
from ctalign.bench.cases import (Case, Unavailable, _api, _last_backend, _out_cols, prepare)

if TYPE_CHECKING:
    from ctalign.bench.plans import Options


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
                from ctalign.ops import _cuda_backend

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
