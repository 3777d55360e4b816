"""Text tables of a run and the description of the machine it ran on.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform

from ctalign.bench.config import GiB


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
        from ctalign import __version__

        info["ctalign"] = __version__
    except ImportError:
        pass
    try:
        from ctalign.ops import _cpu_backend

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
