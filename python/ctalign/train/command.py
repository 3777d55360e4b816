"""``ctalign distill``: the command line of :func:`ctalign.train.distill`."""
from __future__ import annotations

import json


def add_parser(sub, common) -> None:
    from ctalign.train.objectives import LOSSES
    d = sub.add_parser("distill", help="distil one or several teachers into a student with another tokenizer",
                       description="Train a student on a teacher's predictions across tokenizers; report held-out "
                                   "bits per byte before and after, with curves, metrics and the saved student.")
    d.add_argument("--student", required=True, metavar="MODEL",
                   help="transformers folder, .gguf file, or scratch:TOKENIZER[:d=256,layers=4,heads=4]")
    d.add_argument("--teacher", action="append", default=[], metavar="TEACHER[=W]",
                   help="transformers folder, .gguf file or teacher cache folder; repeat for several teachers, "
                        "=W weights them (default 1 each)")
    d.add_argument("--loss", choices=LOSSES, default="likelihood", help="objective (sft: cross-entropy only)")
    d.add_argument("--train", nargs="+", default=[], metavar="DATA", help=".txt / .jsonl training data")
    d.add_argument("--eval", nargs="+", required=True, metavar="DATA", help="held-out .txt / .jsonl data")
    d.add_argument("-o", "--output", default="distill-out", metavar="DIR")
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--max-length", type=int, default=128, help="tokens per side")
    d.add_argument("--lr", type=float, default=5e-5)
    d.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    d.add_argument("--warmup-steps", type=int, default=0)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--top-k", type=int, default=64, help="teacher entries the losses use (0: all)")
    d.add_argument("--ce-weight", type=float, default=None, metavar="W",
                   help="weight of the student's cross-entropy added to the distillation loss (default: the loss's "
                        "own, 1.0 for uld, bld and alm, 0.2 for the others)")
    d.add_argument("--eval-every", type=int, default=0, metavar="N", help="bits per byte every N steps too")
    d.add_argument("--eval-texts", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    d.add_argument("--on-policy", type=float, default=0.0, metavar="P",
                   help="share of steps on the student's own sampled continuations (live teachers)")
    d.add_argument("--on-policy-tokens", type=int, default=32)
    d.add_argument("--fused", action="store_true",
                   help="losses from the student's hidden states and output layer, a chunk of positions at a time "
                        "(never its [batch, length, vocab] logits; not for alm)")
    d.add_argument("--no-save", action="store_true", help="do not save the student")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    common(d)


def run(args, progress: bool) -> int:
    from ctalign.train import DistillConfig, distill
    from ctalign.train.report import format_report
    cfg = DistillConfig(student=args.student, teachers=args.teacher, loss=args.loss, train=args.train,
                        eval=args.eval, out=args.output, steps=args.steps, batch_size=args.batch_size,
                        max_length=args.max_length, lr=args.lr, schedule=args.schedule,
                        warmup_steps=args.warmup_steps, temperature=args.temperature,
                        top_k=args.top_k or None, eval_every=args.eval_every, eval_texts=args.eval_texts,
                        seed=args.seed, threads=args.threads, on_policy=args.on_policy,
                        on_policy_tokens=args.on_policy_tokens, save=not args.no_save, progress=progress,
                        fused=args.fused, ce_weight=args.ce_weight)
    rep = distill(cfg)
    print(json.dumps(rep, sort_keys=True) if args.json else format_report(rep))
    return 0
