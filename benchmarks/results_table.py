#!/usr/bin/env python
"""The distillation results table (docs/results.md): every method, several seeds, one real pair.

Teacher Gemma-3-270M (GGUF, SentencePiece 262k), student SmolLM2-135M-Instruct (GGUF, byte-level BPE
49k), fine-tuned. Training text: four Shakespeare plays (``shakespeare-*`` assets); held-out text:
``botchan-text`` (an English novel): disjoint corpora. The teacher runs once over the training examples
into a teacher cache (``ctalign cache-teacher``); every method then trains from the same cache, with
the same examples, steps, batch, learning rate and seeds (sft ignores the cache's rows). Held-out bits
per byte of the student before and after each run, the teacher's own, and seconds per step.

    python benchmarks/results_table.py --out runs/results           # writes docs/results.md too
    python benchmarks/results_table.py --methods sft likelihood --seeds 0 1 2 --steps 30

Each run is ``ctalign distill`` in a fresh process (its report is the row's source).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sft", "uld", "bld", "likelihood", "alm", "bpm", "escd", "strict_kd")
PLAYS = ("shakespeare-hamlet", "shakespeare-macbeth", "shakespeare-tempest", "shakespeare-twelfth-night")


def _env():
    env = dict(os.environ)
    if any((ROOT / "python" / "ctalign").glob("_core*.so")):
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _ctalign(*args, log):
    cmd = [sys.executable, "-m", "ctalign.cli", *args]
    log(" ".join(cmd))
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    log(f"  done in {time.time() - t0:.0f} s")
    return proc.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--train-examples", type=int, default=240)
    p.add_argument("--eval-texts", type=int, default=48)
    p.add_argument("--student", default=None,
                   help="student spec (default: the SmolLM2-135M-Instruct GGUF, fine-tuned); e.g. "
                        "scratch:SMOLLM2_GGUF:d=192,layers=4,heads=4 for a small student trained from scratch")
    p.add_argument("--setting", default="SmolLM2-135M-Instruct, fine-tuned", help="how the table names the student")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--live-teacher", action="store_true",
                   help="train against the live teacher model (its top-k rows at the same k, computed every step) "
                        "instead of the teacher cache; the runs are named METHOD-live-seedN")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--ce-weight", type=float, default=None, help="ctalign distill --ce-weight (default: each loss's)")
    p.add_argument("--out", default="runs/results")
    p.add_argument("--table", default=str(ROOT / "docs" / "results.md"))
    args = p.parse_args(argv)

    from ctalign import assets
    from ctalign.cache import read_examples

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg):
        line = f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    teacher = str(assets.path("gemma3-gguf"))
    student = args.student or str(assets.path("smollm2-gguf"))
    student = student.replace("SMOLLM2_GGUF", str(assets.path("smollm2-gguf")))
    examples = read_examples([assets.path(n) for n in PLAYS], chunk_chars=600)
    step = max(len(examples) // args.train_examples, 1)
    chosen = examples[::step][: args.train_examples]
    train = out / "train.jsonl"
    train.write_text("".join(json.dumps({"text": ex.text}) + "\n" for ex in chosen))
    held = str(assets.path("botchan-text"))
    cache = out.parent / f"teacher-cache-{len(chosen)}x{args.max_length}"
    shared_train = out.parent / f"train-{len(chosen)}.jsonl"
    if not shared_train.exists():
        shared_train.write_text(train.read_text())
    train = shared_train
    _ctalign("cache-teacher", teacher, str(train), "-o", str(cache), "--top-k", str(args.top_k), "--max-length",
             str(args.max_length), "--batch-size", "4", "--shard-examples", "64", "--json", log=log)
    teacher_args = ["--teacher", teacher, "--train", str(train)] if args.live_teacher else ["--teacher", str(cache)]
    variant = [] if args.ce_weight is None else ["--ce-weight", str(args.ce_weight)]
    common = [*variant, "--student", student, *teacher_args, "--eval", held, "--eval-texts", str(args.eval_texts),
              "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--lr", str(args.lr), "--top-k", str(args.top_k), "--warmup-steps", str(args.warmup_steps),
              "--threads", str(args.threads), "--no-save", "--json", "--quiet"]
    teacher_bpb = None
    rows = {}
    for method in args.methods:
        for seed in args.seeds:
            tag = ("live-" if args.live_teacher else "") + ("" if args.ce_weight is None else f"ce{args.ce_weight:g}-")
            run = out / f"{method}-{tag}seed{seed}"
            if (run / "report.json").exists():
                rep = json.loads((run / "report.json").read_text())
            else:
                rep = json.loads(_ctalign("distill", *common, "--loss", method, "--seed", str(seed), "-o", str(run),
                                          log=log))
            rows.setdefault(method, []).append(rep)
            log(f"{method} seed {seed}: bits per byte {rep['bits_per_byte']['student_before']:.4f} -> "
                f"{rep['bits_per_byte']['student_after']:.4f}, {rep['seconds_per_step']:.2f} s/step")
        if teacher_bpb is None:
            teacher_bpb = _teacher_bpb(teacher, held, args, out, log)
    _write_table(rows, teacher_bpb, args, Path(args.table), out, len(chosen))
    log(f"wrote {args.table}")
    return 0


def _teacher_bpb(teacher, held, args, out, log):
    path = out.parent / f"teacher-bpb-{args.eval_texts}x{args.max_length}.json"
    if path.exists():
        return json.loads(path.read_text())["bits_per_byte"]
    code = ("import json,sys; from ctalign.models import load_gguf_model; from ctalign.cache import read_examples; "
            "from ctalign.train.evaluate import bits_per_byte; m,v=load_gguf_model(sys.argv[1]); "
            "t=[e.text for e in read_examples([sys.argv[2]])][:int(sys.argv[3])]; "
            "print(json.dumps(bits_per_byte(m,v,t,max_length=int(sys.argv[4]))))")
    log("teacher bits per byte")
    proc = subprocess.run([sys.executable, "-c", code, teacher, held, str(args.eval_texts), str(args.max_length)],
                          env=_env(), capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    path.write_text(json.dumps(res))
    return res["bits_per_byte"]


def _fmt(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _write_table(rows, teacher_bpb, args, table: Path, out: Path, n_train: int) -> None:
    first = next(iter(rows.values()))[0]
    before = first["bits_per_byte"]["student_before"]
    sft = [r["bits_per_byte"]["student_after"] for r in rows.get("sft", [])]
    lines = [
        f"## {args.setting}",
        "",
        f"Measured {dt.date.today().isoformat()} on the 2-core CPU machine (torch CPU), with",
        "",
        "```bash",
        " ".join(["python benchmarks/results_table.py", *sys.argv[1:]]),
        "```",
        "",
        f"Teacher Gemma-3-270M (GGUF Q4_K_M, SentencePiece 262k) -> student {args.setting} (SmolLM2's",
        f"byte-level BPE 49k): {args.steps} steps of {args.batch_size} examples (up to {args.max_length} "
        f"tokens), AdamW, lr {args.lr:g} cosine ({args.warmup_steps} warmup), top-{args.top_k} teacher rows from one "
        "teacher cache.",
        f"Training text: {n_train} examples from four Shakespeare plays; held-out: the first {args.eval_texts} "
        "examples of `botchan-text` (a novel), scored as bits per byte (lower is better).",
        "",
        f"- teacher (Gemma-3-270M) on the held-out text: **{teacher_bpb:.4f}** bits per byte",
        f"- student before training: **{before:.4f}**",
        "",
        "| method | held-out bits per byte after (mean ± sd over seeds) | vs sft | seconds per step | ctalign share | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for method, reps in rows.items():
        after = [r["bits_per_byte"]["student_after"] for r in reps]
        delta = f"{statistics.mean(after) - statistics.mean(sft):+.4f}" if sft and method != "sft" else "-"
        sps = statistics.mean(r["seconds_per_step"] for r in reps)
        share = statistics.mean(r["ctalign_share"] for r in reps)
        name = method + (" (live teacher)" if args.live_teacher else "") + (
            "" if args.ce_weight is None else f" (CE weight {args.ce_weight:g})")
        lines.append(f"| {name} | {_fmt(after)} | {delta} | {sps:.2f} | {100 * share:.0f}% | {len(reps)} |")
    lines += ["", "Runs, reports and metrics: the `--out` folder (`*/report.json`, `*/metrics.jsonl`).", ""]
    table.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({m: [r["bits_per_byte"] for r in reps] for m, reps in rows.items()},
                                                 indent=1))
    _plot(rows, teacher_bpb, before, out / "results.png", table.parent / "results.png")


def _plot(rows, teacher_bpb, before, *paths):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    for i, m in enumerate(names):
        vals = [r["bits_per_byte"]["student_after"] for r in rows[m]]
        ax.scatter([i] * len(vals), vals, color="C0")
        ax.hlines(statistics.mean(vals), i - 0.3, i + 0.3, color="C0")
    ax.axhline(before, color="gray", ls="--", label="student before")
    ax.axhline(teacher_bpb, color="C1", ls=":", label="teacher")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out bits per byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
