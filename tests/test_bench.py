"""Smoke tests of the benchmark harness (``ctalign bench``, ``benchmarks/``): it runs, measures what
it says, and writes a parseable JSON and a PNG. Speed is never asserted."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from ctalign import bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the same ctalign as this process: the installed one in CI, the working tree
# (PYTHONPATH=python) in development.
PACKAGE_PARENT = str(Path(__import__("ctalign").__file__).resolve().parents[1])


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---- the harness's own arithmetic ------------------------------------------------------------
def test_timing_median_and_quartiles_match_their_definitions():
    samples = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.4]
    t = bench.Timing.from_samples(samples)
    s = sorted(samples)
    assert t.median == statistics.median(s) == 0.4
    n = len(s)
    # inclusive quartiles: linear interpolation at (n - 1) / 4 and 3 (n - 1) / 4
    assert t.q1 == pytest.approx(s[(n - 1) // 4] + ((n - 1) / 4 % 1) * (s[(n - 1) // 4 + 1] - s[(n - 1) // 4]))
    assert t.q1 <= t.median <= t.q3 and t.n == n
    assert bench.Timing.from_samples([2.0]).as_dict() == {"time_s": 2.0, "q1_s": 2.0, "q3_s": 2.0, "n": 1}
    with pytest.raises(ValueError):
        bench.Timing.from_samples([])


def test_measure_times_a_sleep_within_reason():
    import time

    t = bench.measure(lambda: time.sleep(0.004), target_s=0.05, min_reps=3)
    assert t.n >= 3
    assert 0.003 < t.median < 0.2  # a loaded machine may sleep long; never faster than asked
    calls = []
    slow = bench.measure(lambda: calls.append(time.sleep(0.03)), slow_s=0.01)
    assert slow.n == 1 and len(calls) == 1  # a slow warm-up is the only sample


def test_pair_parsing_names_the_bad_vocabulary():
    assert bench._parse_pair("qwen:llama3") == ("qwen", "llama3")
    assert bench._parse_pair(f"{bench.SYNTHETIC_VOCAB}:gpt2") == (bench.SYNTHETIC_VOCAB, "gpt2")
    with pytest.raises(Exception, match="nope"):
        bench._parse_pair("qwen:nope")
    with pytest.raises(Exception, match="TEACHER:STUDENT"):
        bench._parse_pair("qwen")


def test_table_shows_skips_and_memory_needed():
    rec = {"section": "ops", "op": "project", "pair": "qwen:llama3", "dtype": "fp32", "device": "cpu",
           "threads": 2, "rows": 256, "k": None, "time_s": 0.01, "q1_s": 0.009, "q3_s": 0.012, "n": 5,
           "gbps": 15.5, "positions_per_s": 25600.0, "roofline_ratio": 0.5, "backend": "cpu",
           "baselines": {"torch": {"time_s": 0.1, "ratio": 10.0, "formulation": "index_add"},
                         "dense": {"skipped": "needs 72.3 GiB > budget 8.0 GiB", "memory_bytes": int(72.3 * bench.GiB)},
                         "softmax": {"time_s": 0.05, "ratio": 5.0}}}
    skipped = {**{k: rec[k] for k in ("section", "op", "pair", "dtype", "device", "threads", "rows", "k")},
               "skipped": "ImportError: no module"}
    text = bench.format_table([rec, skipped])
    lines = text.splitlines()
    assert "vs torch" in lines[0] and "roofline" in lines[0]
    assert "10x (index_add)" in lines[2] and "needs 72.3G" in lines[2] and "5.00x" in lines[2]
    assert "skipped: ImportError" in lines[3]


def test_compare_outputs_judges_probabilities_not_vanishing_log_masses():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25 - 1e-9, 1e-9, 0.0]], dtype=torch.float64)).float()
    assert bench.compare_outputs(ref, ref.clone())["agrees"]
    tiny = ref.clone()
    tiny[0, 3] += 0.5  # a 1e-9 mass off by 65%: harmless for any loss
    r = bench.compare_outputs(tiny, ref)
    assert r["agrees"] and r["max_abs_err"] == pytest.approx(0.5) and r["max_abs_err_significant"] < 1e-6
    big = ref.clone()
    big[0, 1] += 1e-3  # a 0.25 mass off by 0.1%
    r = bench.compare_outputs(big, ref)
    assert not r["agrees"] and r["max_abs_err_significant"] == pytest.approx(1e-3, rel=1e-3)
    hole = ref.clone()
    hole[0, 4] = -20.0  # finite where the reference has zero mass
    r = bench.compare_outputs(hole, ref)
    assert not r["agrees"] and r["finite_mismatch"] == 1
    assert "check_error" in bench.compare_outputs(ref[:, :3], ref)


# ---- the real thing, quick mode ----------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    j, png = out / "bench.json", out / "bench.png"
    proc = subprocess.run([sys.executable, "-m", "ctalign.bench", "--quick", "--device", "cpu",
                           "--json", str(j), "--plot", str(png)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    return proc, j, png


def test_quick_bench_runs_and_writes_json_and_png(quick_run):
    proc, j, png = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(j.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert data["quick"] is True and data["machine"]["torch"] == torch.__version__
    assert "vs torch" in proc.stdout and "build-map" in proc.stdout
    sections = {r["section"] for r in data["results"]}
    assert {"ops", "rows", "vocab", "k", "threads"} <= sections


def test_quick_bench_measures_every_op_against_its_baselines(quick_run):
    proc, j, _ = quick_run
    data = json.loads(j.read_text())
    by_op = {}
    for r in data["results"]:
        by_op.setdefault(r["op"], []).append(r)
    for op in bench.OPS:
        recs = by_op.get(op, [])
        assert recs, f"no measurement of {op}"
        done = [r for r in recs if "time_s" in r]
        if op == "uld" and not done:
            continue  # the losses module may not be there yet: reported, not hidden
        assert done, f"{op} was never measured: {recs[0].get('skipped')}"
    for r in data["results"]:
        if "time_s" not in r:
            assert r["skipped"], r
            continue
        assert r["q1_s"] <= r["time_s"] <= r["q3_s"] and r["time_s"] > 0
        assert r["gbps"] == pytest.approx(r["bytes_read"] / r["time_s"] / 1e9)
        assert r["positions_per_s"] == pytest.approx(r["rows"] / r["time_s"])
        roof = r["baselines"]["roofline"]
        assert r["roofline_ratio"] == pytest.approx(roof["time_s"] / r["time_s"])
        if r["op"] in ("next_byte", "project", "cover", "byte_conditional", "project_within"):
            # the I/O bound: reading the logits (the roofline) plus writing an output of the op's shape
            write = r["baselines"]["write"]
            out_rows = r["queries"] if r["op"] in ("byte_conditional", "project_within") else r["rows"]
            assert write["bytes"] == out_rows * r["out_cols"] * (8 if r["dtype"] == "fp64" else 4)
            assert r["io_bound_ratio"] == pytest.approx(roof["time_s"] / (roof["time_s"] + write["time_s"]))
        else:
            assert "io_bound_ratio" not in r and "write" not in r["baselines"]
        for name, b in r["baselines"].items():
            if "time_s" in b:
                assert b["ratio"] == pytest.approx(b["time_s"] / r["time_s"]), name
        # what is timed is what the reference computes
        if r["op"] != "uld":
            assert r.get("agrees") is True, r


def test_quick_bench_reports_dense_memory_instead_of_running_it(quick_run):
    _, j, _ = quick_run
    data = json.loads(j.read_text())
    project = next(r for r in data["results"] if r["section"] == "ops" and r["op"] == "project" and "time_s" in r)
    dense = project["baselines"]["dense"]
    v_t, v_s = project["V_teacher"], project["V_student"]
    assert dense["memory_bytes"] == v_t * (v_s + 1) * 4
    assert "needs" in dense["skipped"]  # 50k x 32k fp32 is over the quick budget of 1 GiB
    nb = next(r for r in data["results"] if r["section"] == "ops" and r["op"] == "next_byte" and "time_s" in r)
    assert nb["baselines"]["dense"]["memory_bytes"] == nb["V_teacher"] * 257 * 4
    assert "time_s" in nb["baselines"]["dense"]  # V x 257 fits: it ran


def test_quick_bench_times_build_map_with_peak_memory(quick_run):
    _, j, _ = quick_run
    data = json.loads(j.read_text())
    assert data["build_map"], "no build-map measurement"
    for r in data["build_map"]:
        assert "skipped" not in r, r
        assert r["build_s"] > 0 and r["peak_rss_delta_mb"] >= 0 and r["artifact_mb"] > 0
        assert r["regime"] in ("identical", "subset", "general")


def test_ctalign_bench_is_forwarded_by_the_cli(capsys):
    cli = pytest.importorskip("ctalign.cli")
    rc = cli.main(["bench", "--quick", "--list", "--sections", "ops", "--ops", "next_byte", "project"])
    assert rc in (0, None)
    listed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ops ")]
    assert [line.split()[1] for line in listed] == ["next_byte", "project"]


def test_benchmark_suite_collects():
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    m = re.search(r"(\d+) tests? collected", proc.stdout)
    assert m and int(m.group(1)) >= 50, proc.stdout[-2000:]
