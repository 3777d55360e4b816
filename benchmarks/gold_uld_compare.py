#!/usr/bin/env python
"""TRL GOLD's ULD loss against ``ctalign.losses.uld_loss`` on one batch of the real Gemma-3-270M
(teacher) -> SmolLM2-135M (student) pair: forward + backward time of the loss alone, and agreement
(loss value, gradient w.r.t. the student logits).

What is timed (forward + ``.backward()`` on the scalar, logits fixed, median of ``--reps`` after one
warm-up):

* GOLD: ``trl.experimental.gold.gold_trainer.ULDLoss.__call__`` (TRL 1.16.0), the module that
  ``GOLDTrainer.__init__`` builds as ``self.uld_loss_fn`` and ``GOLDTrainer.compute_loss`` calls with
  ``student_logits, teacher_logits, student_labels, teacher_labels, student_input_ids,
  teacher_input_ids``. It is built here from a real ``GOLDConfig`` (``use_uld_loss=True``,
  ``use_extended_uld=False``, the other ``uld_*`` options at TRL's defaults: CE weight 0, distillation
  weight 1, temperatures 1, ``uld_skip_student_eos`` / ``uld_skip_teacher_eos`` True, no hybrid term)
  without tokenizers (only the hybrid term uses them); no trainer and no model is built. With CE weight
  0 the call is ``ULDLoss._compute_distillation_loss``: per example, the answer span (``labels !=
  -100``, less its last token with skip-eos) of each side, truncated to the shorter one (positional,
  ``use_extended_uld=False``), softmax, full sort of both vocabularies, zero-pad, L1 summed over the
  vocabulary and the positions and divided by the number of positions (a per-sequence mean); then the
  mean over the batch (``torch.stack(...).mean()``). GOLD's extended (byte-offset) ULD is not used: it
  needs the fast tokenizer's byte offsets and refuses Gemma's non-byte-level tokenizer.
* ctalign: ``ctalign.losses.uld_loss(..., align="positional", ce_weight=0.0,
  distance_mean="examples")``, exact (``top_k=None``: compiled radix sorts of both full rows) and
  ``top_k=256`` (top 256 of each side plus the tail-mass difference, a lower bound of the exact
  distance). ``distance_mean="examples"`` is GOLD's averaging: per example, then over the examples.

Same positions on both sides: the batch is ctalign's ``DistillationCollator`` batch (whole texts:
every token but the bos is a target, the eos included); GOLD's labels are its ids where the collator's
loss mask is set and -100 elsewhere, so GOLD's answer spans are exactly those tokens. GOLD's logit
rows are the answer positions (``uld_token_merge_strategy="observed"``, TRL's default: the row at a
token's own position) or the positions one earlier (``"bayesian"``: the row that predicts the token);
ctalign scores the row before each target, so its student/teacher masks are GOLD's rows shifted by
one. The per-example pair counts of both sides are checked to be equal before timing. GOLD's own
collation (``build_teacher_inputs_from_texts`` with each side's transformers tokenizer, prompt ``""``,
completion = the text) is timed and its ids compared with ctalign's; it is not what the losses are fed
(its student side has no bos, so its tensors have another shape).

Logits are random (``torch.manual_seed(0)``, ``randn x --scale``), teacher ``[B, Lt, 262144]``, student
``[B, Ls, 49152]`` with ``requires_grad``; no model weights are loaded. One torch thread.

    pip install --no-deps --target /tmp/trl-pkg trl==1.16.0 datasets pandas pyarrow dill multiprocess xxhash
    PYTHONPATH=python nice python benchmarks/gold_uld_compare.py --reps 3 --json gold-uld.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TEACHER_ASSET = "gemma3-gguf"
STUDENT_ASSET = "smollm2-gguf"
TEXT_ASSET = "botchan-text"
INSTALL_HINT = ("pip install --no-deps --target {path} trl==1.16.0 "
                "(and, if an import still fails, datasets pandas pyarrow dill multiprocess xxhash the same way)")


def progress(msg: str) -> None:
    print(f"[gold_uld_compare] {msg}", file=sys.stderr, flush=True)


def import_gold(trl_path: str):
    """(trl module, GOLDConfig, ULDLoss, build_teacher_inputs_from_texts) from --trl-path, or exit 2."""
    if trl_path and trl_path not in sys.path:
        sys.path.insert(0, trl_path)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
        from trl.experimental.gold import GOLDConfig
        from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts
    except ImportError as e:
        print(f"cannot import trl.experimental.gold ({e}); install it with: {INSTALL_HINT.format(path=trl_path)}",
              file=sys.stderr)
        raise SystemExit(2)
    return trl, GOLDConfig, ULDLoss, build_teacher_inputs_from_texts


def make_texts(student_vocab, n_texts: int, n_tokens: int) -> list[str]:
    """Slices of the novel of ``n_tokens - 2`` student tokens each (bos and eos make ``n_tokens``)."""
    from ctalign import assets
    text = assets.path(TEXT_ASSET).read_text(encoding="utf-8")
    base = student_vocab.encode(text[:200000])
    out = []
    for i in range(n_texts):
        lo = 3000 + 911 * i  # past the Project Gutenberg header, spread over the novel
        out.append(student_vocab.decode_bytes(base[lo:lo + n_tokens - 2]).decode("utf-8", errors="ignore"))
    return out


def timed(fn, reps: int, label: str) -> tuple[float, list[float]]:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up; a progress line per run."""
    times = []
    for r in range(reps + 1):
        tag = "warm-up" if r == 0 else f"rep {r}/{reps}"
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        progress(f"{label}: {tag} {dt:.3f} s")
        if r:
            times.append(dt)
    return statistics.median(times), times


def gold_rows_to_ctalign_mask(labels, starts, sizes, strategy: str, skip_eos: bool):
    """ctalign target mask [B, L] that scores GOLD's logit rows: GOLD's answer span ``[start, start +
    size)`` (less its last token with skip-eos) gives rows ``[start, ...)`` ("observed") or ``[start - 1,
    ...)`` ("bayesian"); ctalign scores the row before each target, so its targets are those rows + 1."""
    import torch
    B, L = labels.shape
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        n = sizes[b] - (1 if skip_eos else 0)
        if n <= 0:
            continue
        first_row = starts[b] if strategy == "observed" else starts[b] - 1
        if first_row < 0:  # "bayesian" drops an unscorable leading target on both sides; not reproduced
            raise ValueError(f"example {b}: the answer starts at position 0 (no bos); use --merge-strategy observed")
        if first_row + n + 1 > L:
            raise ValueError(f"example {b}: GOLD's last row {first_row + n - 1} has no following position in ctalign")
        mask[b, first_row + 1:first_row + n + 1] = True
    return mask


def compare_ids(ctalign_ids, ctalign_len, gold_ids, gold_att) -> str:
    """How GOLD's own tokenization of a side compares with ctalign's, in words."""
    same = bos_only = 0
    first_diff = None
    for b in range(ctalign_ids.shape[0]):
        c = ctalign_ids[b, :int(ctalign_len[b])].tolist()
        g = gold_ids[b, :int(gold_att[b].sum())].tolist()
        if c == g:
            same += 1
        elif c[1:] == g:
            bos_only += 1
        elif first_diff is None:
            k = next((i for i, (x, y) in enumerate(zip(c, g)) if x != y), min(len(c), len(g)))
            first_diff = f"row {b} first differs at token {k} (ctalign {len(c)}, GOLD {len(g)} tokens)"
    B = ctalign_ids.shape[0]
    parts = []
    if same:
        parts.append(f"{same}/{B} rows identical")
    if bos_only:
        parts.append(f"{bos_only}/{B} rows identical but for ctalign's leading bos (the transformers tokenizer adds none)")
    if first_diff:
        parts.append(f"{B - same - bos_only}/{B} rows differ: {first_diff}")
    return "; ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl-path", default="/tmp/trl-pkg", help="folder holding trl (pip install --target)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--batch", type=int, default=4, help="texts in the batch")
    p.add_argument("--student-tokens", type=int, default=128, help="student tokens per text (bos, eos included)")
    p.add_argument("--top-k", type=int, default=256, help="k of the approximate ctalign run")
    p.add_argument("--merge-strategy", choices=("observed", "bayesian"), default="observed",
                   help="GOLD's uld_token_merge_strategy (with positional ULD it only picks the logit rows)")
    p.add_argument("--scale", type=float, default=3.0, help="logits = randn x scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-hf-tokenizers", action="store_true",
                   help="skip GOLD's own collation (loading the transformers tokenizers takes ~20 s)")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")

    trl, GOLDConfig, GoldULDLoss, build_teacher_inputs_from_texts = import_gold(args.trl_path)
    import torch
    torch.set_num_threads(args.threads)
    from ctalign import assets, build_map
    from ctalign.data import DistillationCollator
    from ctalign.losses import uld_loss
    from ctalign.vocab import load_vocab

    setup: dict[str, float] = {}
    per_batch: dict[str, float] = {}

    # --- ctalign side: vocabularies, map, collation --------------------------------------------
    progress("loading ctalign vocabularies")
    t0 = time.perf_counter()
    t_path, s_path = assets.path(TEACHER_ASSET), assets.path(STUDENT_ASSET)
    tv, sv = load_vocab(t_path), load_vocab(s_path)
    setup["ctalign load_vocab x2"] = time.perf_counter() - t0
    progress("build_map (teacher -> student)")
    t0 = time.perf_counter()
    amap = build_map(tv, sv)
    setup["ctalign build_map"] = time.perf_counter() - t0
    texts = make_texts(sv, args.batch, args.student_tokens)
    collate = DistillationCollator(amap)
    per_batch["ctalign DistillationCollator(texts)"], _ = timed(lambda: collate(texts), args.reps,
                                                               "ctalign collation")
    batch = collate(texts)
    s_ids, t_ids = batch["student_input_ids"], batch["teacher_input_ids"]
    alignment = batch["alignment"]
    B, Ls = s_ids.shape
    Lt = t_ids.shape[1]
    Vs, Vt = len(sv), len(tv)

    # --- GOLD: config, loss module, labels over the same tokens -----------------------------------
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = GOLDConfig(output_dir=out_dir, use_uld_loss=True, use_extended_uld=False,
                         uld_token_merge_strategy=args.merge_strategy, report_to="none", bf16=False, use_cpu=True,
                         per_device_train_batch_size=B)
    gold = GoldULDLoss(cfg)
    if cfg.uld_crossentropy_weight != 0.0 or gold.use_hybrid_loss:
        raise SystemExit("GOLDConfig defaults changed: CE weight or hybrid loss not off")
    s_labels = torch.where(batch["student_loss_mask"], s_ids, torch.full_like(s_ids, -100))
    t_labels = torch.where(batch["teacher_loss_mask"], t_ids, torch.full_like(t_ids, -100))
    s_start, s_size = gold._get_start_and_size_answers(s_labels)
    t_start, t_size = gold._get_start_and_size_answers(t_labels)
    s_mask = gold_rows_to_ctalign_mask(s_labels, s_start, s_size, args.merge_strategy, cfg.uld_skip_student_eos)
    t_mask = gold_rows_to_ctalign_mask(t_labels, t_start, t_size, args.merge_strategy, cfg.uld_skip_teacher_eos)
    gold_pairs = [min(a - cfg.uld_skip_student_eos, c - cfg.uld_skip_teacher_eos) for a, c in zip(s_size, t_size)]
    ctalign_pairs = torch.minimum(s_mask[:, 1:].sum(1), t_mask[:, 1:].sum(1)).tolist()
    if gold_pairs != ctalign_pairs:
        raise SystemExit(f"pair counts differ: GOLD {gold_pairs}, ctalign {ctalign_pairs}")

    # --- GOLD's own collation (transformers tokenizers) ---------------------------------------------
    gold_collation = {}
    if not args.no_hf_tokenizers:
        import transformers
        progress("loading the transformers tokenizers from the GGUF files (slow)")
        t0 = time.perf_counter()
        t_tok = transformers.AutoTokenizer.from_pretrained(str(t_path.parent), gguf_file=t_path.name)
        s_tok = transformers.AutoTokenizer.from_pretrained(str(s_path.parent), gguf_file=s_path.name)
        setup["GOLD AutoTokenizer.from_pretrained x2"] = time.perf_counter() - t0
        prompts = [""] * B

        def gold_collate():
            return (build_teacher_inputs_from_texts(t_tok, prompts, texts, use_extended_uld=False),
                    build_teacher_inputs_from_texts(s_tok, prompts, texts, use_extended_uld=False))

        per_batch["GOLD build_teacher_inputs_from_texts x2"], _ = timed(gold_collate, args.reps, "GOLD collation")
        (gt_ids, _, gt_att, _), (gs_ids, _, gs_att, _) = gold_collate()
        gold_collation = {
            "teacher": compare_ids(t_ids, alignment.teacher_lengths, gt_ids, gt_att),
            "student": compare_ids(s_ids, alignment.student_lengths, gs_ids, gs_att),
        }

    # --- logits -----------------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    teacher_logits = torch.randn(B, Lt, Vt) * args.scale
    student_base = torch.randn(B, Ls, Vs) * args.scale
    progress(f"batch: B={B}, student {Ls} x {Vs}, teacher {Lt} x {Vt}, pairs per example {gold_pairs}")

    def run_gold(x):
        return gold(student_logits=x, teacher_logits=teacher_logits, student_labels=s_labels,
                    teacher_labels=t_labels, student_input_ids=s_ids, teacher_input_ids=t_ids)

    def run_ctalign(x, top_k):
        return uld_loss(x, teacher_logits, s_ids, alignment=alignment, student_mask=s_mask, teacher_mask=t_mask,
                        align="positional", top_k=top_k, student_vocab_size=Vs, teacher_vocab_size=Vt,
                        uld_weight=cfg.uld_distillation_weight, ce_weight=0.0, distance_mean="examples",
                        student_temperature=cfg.uld_student_temperature,
                        teacher_temperature=cfg.uld_teacher_temperature)

    methods = [
        ("GOLD ULDLoss", run_gold),
        ("ctalign uld_loss exact", lambda x: run_ctalign(x, None)),
        (f"ctalign uld_loss top_k={args.top_k}", lambda x: run_ctalign(x, args.top_k)),
    ]
    results = {}
    for name, fn in methods:
        x = student_base.clone().requires_grad_(True)
        last = {}

        def step():
            x.grad = None
            loss = fn(x)
            loss.backward()
            last["loss"] = float(loss.detach())

        med, times = timed(step, args.reps, f"{name} fwd+bwd")
        results[name] = {"seconds": med, "times": times, "loss": last["loss"], "grad": x.grad.detach().clone()}

    gold_name, exact_name, topk_name = (m[0] for m in methods)
    g_ref = results[gold_name]
    for r in results.values():
        r["ratio_to_gold"] = r["seconds"] / g_ref["seconds"]
    agreement = {}
    for name in (exact_name, topk_name):
        r = results[name]
        agreement[name] = {
            "abs_loss_diff": abs(r["loss"] - g_ref["loss"]),
            "rel_loss_diff": abs(r["loss"] - g_ref["loss"]) / max(abs(g_ref["loss"]), 1e-30),
            "max_abs_grad_diff": float((r["grad"] - g_ref["grad"]).abs().max()),
        }
    max_abs_grad_gold = float(g_ref["grad"].abs().max())

    # --- report ---------------------------------------------------------------------------------------------
    print(f"\nGOLD (TRL {trl.__version__}) ULD vs ctalign uld_loss: {TEACHER_ASSET} -> {STUDENT_ASSET}, "
          f"B={B}, student {Ls} tokens x {Vs:,}, teacher {Lt} tokens x {Vt:,}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"forward + backward of the loss alone, median of {args.reps} after one warm-up\n")
    print("| loss | seconds | ratio to GOLD | loss value | abs diff vs GOLD | max abs grad diff vs GOLD |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        a = agreement.get(name)
        diff = f"{a['abs_loss_diff']:.3e}" if a else "-"
        gdiff = f"{a['max_abs_grad_diff']:.3e}" if a else "-"
        print(f"| {name} | {r['seconds']:.3f} | {r['ratio_to_gold']:.3f} | {r['loss']:.8f} | {diff} | {gdiff} |")
    print(f"\n(ratio = time / GOLD's time; max |GOLD gradient| = {max_abs_grad_gold:.3e}; "
          f"top_k={args.top_k} is an approximation, a lower bound of the exact distance, not a convention match)\n")
    print("| alignment / collation | seconds |")
    print("| --- | ---: |")
    for k, v in setup.items():
        print(f"| {k} (one-time) | {v:.3f} |")
    for k, v in per_batch.items():
        print(f"| {k} (per batch, median) | {v:.4f} |")
    print("\nConventions: positional pairing (GOLD use_extended_uld=False; ctalign align='positional'), the same "
          f"logit rows (GOLD uld_token_merge_strategy={args.merge_strategy!r}, eos skipped on both sides; ctalign masks "
          f"= GOLD's rows + 1), pairs per example {gold_pairs} on both, temperatures "
          f"{cfg.uld_student_temperature}/{cfg.uld_teacher_temperature}, no CE term, per-example mean then batch "
          "mean (ctalign distance_mean='examples'). No difference in what is scored.")
    if gold_collation:
        print(f"GOLD's own collation vs ctalign's ids: teacher {gold_collation['teacher']}; "
              f"student {gold_collation['student']} (the losses are fed ctalign's batch).")

    if args.json:
        out = {
            "pair": {"teacher": TEACHER_ASSET, "student": STUDENT_ASSET},
            "shape": {"batch": B, "student_len": Ls, "teacher_len": Lt, "student_vocab": Vs, "teacher_vocab": Vt},
            "pairs_per_example": gold_pairs,
            "trl_version": trl.__version__, "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "reps": args.reps, "merge_strategy": args.merge_strategy,
            "top_k": args.top_k, "scale": args.scale, "seed": args.seed,
            "loss": {n: {k: v for k, v in r.items() if k != "grad"} for n, r in results.items()},
            "agreement_vs_gold": agreement, "max_abs_grad_gold": max_abs_grad_gold,
            "setup_seconds": setup, "per_batch_seconds": per_batch, "gold_collation_vs_ctalign": gold_collation,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
