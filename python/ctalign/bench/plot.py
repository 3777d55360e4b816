"""Plots of a run: the op table against the roofline, and the scaling sections.
"""
from __future__ import annotations

import os

from ctalign.bench.config import SYNTHETIC_VOCAB


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
