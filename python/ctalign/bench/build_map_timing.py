"""``build-map`` timings, each pair in its own process so that its peak memory is the build's own.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ctalign.bench.config import MiB
from ctalign.bench.timing import (_rss_kb, _reset_peak_rss)
from ctalign.bench.workspace import load_bench_vocab



def build_map_worker(teacher: str, student: str, repeats: int, with_tracemalloc: bool) -> dict:
    """Runs in a child process: parse both vocabularies, build the map (timed, peak RSS), rebuild
    ``repeats`` times, save and load the artifact, and optionally a tracemalloc'd build."""
    import resource

    from ctalign.alignment_map import AlignmentMap, build_map, prepare_for_mapping

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
