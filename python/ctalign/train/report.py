"""The outputs a person reads after ``ctalign distill``: ``report.json``, ``report.txt``, ``curves.png``."""
from __future__ import annotations

import json
from pathlib import Path


def format_report(rep: dict) -> str:
    b = rep["bits_per_byte"]
    teachers = ", ".join(f"{t['name']} ({t['source']}, {t['regime']}, weight {t['weight']:.2f})" for t in rep["teachers"])
    lines = [
        f"student   {rep['student']}",
        f"teachers  {teachers or 'none (sft)'}",
        f"loss      {rep['config']['loss']}, {rep['steps']} steps of {rep['config']['batch_size']} examples, "
        f"lr {rep['config']['lr']:g} ({rep['config']['schedule']}), seed {rep['config']['seed']}",
        f"held-out  bits per byte: student {b['student_before']:.4f} -> {b['student_after']:.4f}"
        + "".join(f"; teacher {k[8:]} {v:.4f}" for k, v in b.items() if k.startswith("teacher_"))
        + f" ({rep['eval_bytes']:,} bytes)",
        f"time      {rep['seconds_per_step']:.2f} s per step; ctalign (collate, align, targets, loss forward) "
        f"{100 * rep['ctalign_share']:.1f}% of it",
    ]
    if rep.get("saved_student"):
        lines.append(f"saved     {rep['saved_student']}")
    return "\n".join(lines)


def write_report(rep: dict, out: Path) -> None:
    from ctalign.artifact import _write_atomic
    _write_atomic(out / "report.json", (json.dumps(rep, indent=1, sort_keys=True) + "\n").encode())
    _write_atomic(out / "report.txt", (format_report(rep) + "\n").encode())


def plot_curves(metrics_path: Path, evals: list[dict], path: Path, loss_name: str) -> bool:
    """The training loss per step and the held-out bits per byte; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, losses = [], []
    for line in Path(metrics_path).read_text().splitlines():
        r = json.loads(line)
        steps.append(r["step"])
        losses.append(r["loss"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, losses, color="C0")
    a.set_title(f"training loss ({loss_name})")
    a.set_xlabel("step")
    b.plot([e["step"] for e in evals], [e["bits_per_byte"] for e in evals], marker="o", color="C1")
    b.set_title("held-out bits per byte (student)")
    b.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
