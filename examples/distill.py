#!/usr/bin/env python
"""Distil a teacher language model into a student that uses a different tokenizer.

Any of the ctalign losses (``--loss uld|bld|likelihood|alm|bpm|escd|strict_kd``; ``--loss ce`` trains the student on
its own cross-entropy only, the baseline), on

* real models from local directories (``--teacher-model DIR --student-model DIR``: Hugging Face
  ``transformers`` causal LMs with their ``tokenizer.json``; needs ``transformers`` installed), or
* small GPT-like models built here (the default): one per side, with the vocabulary size of a real
  tokenizer (``--teacher-tokenizer``/``--student-tokenizer``: ctalign asset names or tokenizer
  paths). The small teacher is first trained on the training text for ``--teacher-steps`` steps so
  that it has something to teach.

The text is the ``botchan-text`` asset (an English novel): the first 90 % trains, the last 10 % is
held out. The script shows a progress bar, saves the loss curve (``OUT/loss_curve.png``) and a
summary (``OUT/summary.json``), and reports the student's bits per byte on the held-out text before
and after distillation (bits per byte compare models across tokenizers: the log-loss of every
predicted token, in bits, over the UTF-8 bytes those tokens cover).

    python examples/distill.py --loss likelihood                      # ~1 min on 2 CPU cores
    python examples/distill.py --loss bld --steps 200 --out runs/bld
    python examples/distill.py --teacher-model ./teacher --student-model ./student --loss alm
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
if any((HERE.parent / "python" / "ctalign").glob("_core*.so")):  # a checkout built with tools/dev-build
    sys.path.insert(0, str(HERE.parent / "python"))

from ctalign import assets, build_map, load_vocab  # noqa: E402
from ctalign import losses as L  # noqa: E402
from ctalign.data import DistillationCollator  # noqa: E402

LOSSES = ("uld", "bld", "likelihood", "alm", "bpm", "escd", "strict_kd", "ce")  # ce: no teacher, the baseline to compare with


# ------------------------------------------------------------------------------------------------
# a small GPT
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, causal):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-norm transformer blocks, tied output layer."""

    def __init__(self, vocab_size: int, d: int = 64, layers: int = 2, heads: int = 4, context: int = 256):
        super().__init__()
        self.vocab_size = vocab_size
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.hidden_size = d
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def hidden_states(self, ids, attention_mask=None):
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))[None]
        causal = torch.triu(torch.full((T, T), float("-inf"), device=ids.device), 1)
        for blk in self.blocks:
            x = blk(x, causal)
        return self.ln(x)

    def output_head(self):
        return L.LMHead(self.tok.weight)  # tied: the token embeddings

    def forward(self, ids, attention_mask=None):
        h = self.hidden_states(ids, attention_mask)
        return h @ self.tok.weight.T, h  # logits, last hidden states


class HFModel(nn.Module):
    """A transformers causal LM behind the same (logits, hidden) interface."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.hidden_size = self.model.config.hidden_size

    def hidden_states(self, ids, attention_mask=None):
        return self.model.base_model(input_ids=ids, attention_mask=attention_mask)[0]

    def output_head(self):
        return L.LMHead.of(self.model)  # tied or not, with the config's logit soft-capping / scaling

    def forward(self, ids, attention_mask=None):
        out = self.model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def load_tokenizer(spec: str):
    if spec in assets.ASSETS or spec == "gpt2":
        if spec == "gpt2":
            return load_vocab((assets.path("gpt2-encoder"), assets.path("gpt2-merges")), name="gpt2")
        return load_vocab(assets.path(spec), name=spec)
    return load_vocab(spec)


def text_chunks(chars_per_chunk: int, held_out_share: float = 0.1):
    text = assets.path("botchan-text").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    joined, chunks = "", []
    for p in paragraphs:
        p = " ".join(p.split())
        while p:
            room = chars_per_chunk - len(joined)
            if len(p) <= room:
                joined = (joined + " " + p).strip() if joined else p
                p = ""
            else:
                cut = p.rfind(" ", 0, room)
                cut = room if cut <= 0 else cut
                joined = (joined + " " + p[:cut]).strip() if joined else p[:cut]
                p = p[cut:].strip()
                chunks.append(joined)
                joined = ""
    if joined:
        chunks.append(joined)
    n_held = max(1, int(len(chunks) * held_out_share))
    return chunks[:-n_held], chunks[-n_held:]


def to(batch, device):
    return {k: (v.to(device) if hasattr(v, "to") and not isinstance(v, str) else v) for k, v in batch.items()}


@torch.no_grad()
def bits_per_byte(model, collate, texts, side: str, vocab_size: int, batch_size: int, device) -> float:
    """Sum of -log2 p over every predicted token / the UTF-8 bytes those tokens cover."""
    model.eval()
    nll, n_bytes = 0.0, 0
    for i in range(0, len(texts), batch_size):
        b = to(collate(texts[i:i + batch_size]), device)
        ids, att = b[f"{side}_input_ids"], b[f"{side}_attention_mask"]
        a = b["alignment"]
        start = a.t_start if side == "teacher" else a.s_start
        end = a.t_end if side == "teacher" else a.s_end
        logits, _ = model(ids, att)
        lp = torch.log_softmax(logits[:, :-1, :vocab_size].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = att[:, 1:].bool()
        nll -= float(lp[m].sum())
        width = (end - start)[:, 1:].to(device)
        n_bytes += int(width[m].sum())
    model.train()
    return nll / math.log(2) / max(n_bytes, 1)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--loss", choices=LOSSES, default="likelihood")
    p.add_argument("--teacher-tokenizer", default="botchan-bpe", help="asset name or tokenizer path")
    p.add_argument("--student-tokenizer", default="botchan-unigram", help="asset name or tokenizer path")
    p.add_argument("--teacher-model", default=None, help="local transformers model directory (teacher)")
    p.add_argument("--student-model", default=None, help="local transformers model directory (student)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps")
    p.add_argument("--teacher-steps", type=int, default=300, help="training steps of the small teacher")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96, help="tokens per side")
    p.add_argument("--chunk-chars", type=int, default=300, help="characters per training text")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-texts", type=int, default=32, help="held-out texts for bits per byte")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (small models run fastest on one; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="distill-out", help="output folder (plot, summary)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fused", action="store_true",
                   help="the student's losses from its hidden states and output layer, a chunk of positions at a "
                        "time (ctalign.losses.fused: no [batch, length, vocab] student logits; not for alm)")
    args = p.parse_args(argv)
    if args.fused and args.loss == "alm":
        p.error("--fused: the alm loss has no fused form")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    teacher_vocab = load_vocab(args.teacher_model) if args.teacher_model else load_tokenizer(args.teacher_tokenizer)
    student_vocab = load_vocab(args.student_model) if args.student_model else load_tokenizer(args.student_tokenizer)
    amap = build_map(teacher_vocab, student_vocab)
    print(f"teacher {teacher_vocab.name} ({len(teacher_vocab):,} ids) -> student {student_vocab.name} "
          f"({len(student_vocab):,} ids): {amap.regime} regime")
    K = 10
    collate = DistillationCollator(amap, max_length=args.max_length, byte_queries=K if args.loss == "bld" else 0)
    train, held = text_chunks(args.chunk_chars)
    held = held[: args.eval_texts]

    def make(path, vocab):
        if path:
            return HFModel(path)
        return TinyGPT(len(vocab), d=args.d_model, layers=args.layers, context=args.max_length)

    teacher = make(args.teacher_model, teacher_vocab).to(device)
    student = make(args.student_model, student_vocab).to(device)
    g = torch.Generator().manual_seed(args.seed)

    def batches(n):
        for _ in range(n):
            idx = torch.randint(len(train), (args.batch_size,), generator=g).tolist()
            yield to(collate([train[i] for i in idx]), device)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    def progress(it, total, desc):
        if tqdm is None or args.no_progress:
            return it
        return tqdm(it, total=total, desc=desc, dynamic_ncols=True)

    curves = {"teacher_ce": [], "distill": []}
    if not args.teacher_model and args.teacher_steps > 0:
        opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
        for b in progress(batches(args.teacher_steps), args.teacher_steps, "teacher (CE)"):
            logits, _ = teacher(b["teacher_input_ids"], b["teacher_attention_mask"])
            loss = L.cross_entropy(logits, b["teacher_input_ids"], mask=b["teacher_loss_mask"],
                                   vocab_size=len(teacher_vocab))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curves["teacher_ce"].append(loss.item())
    teacher.eval()
    for p_ in teacher.parameters():
        p_.requires_grad_(False)

    head = L.ByteHead(student.hidden_size, num_bytes=K).to(device) if args.loss == "bld" else None
    if args.loss == "uld":
        loss_fn = L.ULDLoss(align="byte", top_k=256, temperature=args.temperature,
                            student_vocab_size=len(student_vocab), teacher_vocab_size=len(teacher_vocab))
    elif args.loss == "bld":
        loss_fn = L.ByteLevelDistillationLoss(student_vocab, teacher_vocab, num_bytes=K, temperature=args.temperature)
    elif args.loss == "likelihood":
        loss_fn = L.LikelihoodDistillationLoss(amap, temperature=args.temperature)
    elif args.loss == "bpm":  # + 0.2 CE as the likelihood loss has; the whitespace row mask is on
        loss_fn = L.BPMLoss(amap, ce_weight=0.2, temperature=args.temperature)
    elif args.loss == "escd":
        loss_fn = L.ESCDLoss(amap, ce_weight=0.2, temperature=args.temperature)
    elif args.loss == "strict_kd":
        loss_fn = L.StrictAlignmentKDLoss(amap, ce_weight=0.2, temperature=args.temperature)
    elif args.loss == "alm":
        loss_fn = L.ApproximateLikelihoodMatchingLoss(temperature=args.temperature, student_vocab=student_vocab,
                                                      teacher_vocab=teacher_vocab)
    else:
        loss_fn = None

    bpb_teacher = bits_per_byte(teacher, collate, held, "teacher", len(teacher_vocab), args.batch_size, device)
    bpb_before = bits_per_byte(student, collate, held, "student", len(student_vocab), args.batch_size, device)
    params = list(student.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=args.lr)
    t_distill = time.perf_counter()
    bar = progress(batches(args.steps), args.steps, f"student ({args.loss})")
    for b in bar:
        with torch.no_grad():
            t_logits, _ = teacher(b["teacher_input_ids"], b["teacher_attention_mask"])
        ids, a = b["student_input_ids"], b["alignment"]
        sm, tm = b["student_loss_mask"], b["teacher_loss_mask"]
        if args.fused:
            hidden = student.hidden_states(ids, b["student_attention_mask"])
            fused = L.FusedStudentHead(student.output_head(), loss_fn)
            if args.loss == "uld":
                loss = fused(hidden, t_logits, ids, a, sm, tm)
            elif args.loss == "bld":
                loss = fused(hidden, head(hidden), t_logits, ids, a, sm)
            elif loss_fn is not None:
                loss = fused(hidden, t_logits, ids, a, sm)
            else:
                loss = fused(hidden, ids, sm, vocab_size=len(student_vocab))
        else:
            s_logits, hidden = student(ids, b["student_attention_mask"])
        if args.fused:
            pass
        elif args.loss == "uld":
            loss = loss_fn(s_logits, t_logits, ids, a, sm, tm)
        elif args.loss == "bld":
            loss = loss_fn(s_logits, head(hidden), t_logits, ids, a, sm)
        elif args.loss in ("likelihood", "bpm", "escd", "strict_kd"):
            loss = loss_fn(s_logits, t_logits, ids, a, sm)
        else:
            loss = L.cross_entropy(s_logits, ids, mask=sm, vocab_size=len(student_vocab))
            if args.loss == "alm":  # ALM is added to the student's own cross-entropy
                loss = loss + loss_fn(s_logits, t_logits, ids, b["teacher_input_ids"], a, sm, tm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curves["distill"].append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    distill_s = time.perf_counter() - t_distill
    bpb_after = bits_per_byte(student, collate, held, "student", len(student_vocab), args.batch_size, device)

    summary = {
        "loss": args.loss, "teacher": teacher_vocab.name, "student": student_vocab.name, "regime": amap.regime,
        "steps": args.steps, "teacher_steps": args.teacher_steps if not args.teacher_model else 0,
        "bits_per_byte": {"teacher": bpb_teacher, "student_before": bpb_before, "student_after": bpb_after},
        "final_loss": curves["distill"][-1] if curves["distill"] else None,
        "distill_seconds": distill_s, "total_seconds": time.perf_counter() - t_start,
        "held_out_texts": len(held),
    }
    plot_curves(curves, out / "loss_curve.png", args.loss)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"bits per byte on held-out text: teacher {bpb_teacher:.3f}, student {bpb_before:.3f} -> {bpb_after:.3f} "
          f"({args.steps} steps of {args.loss}, {distill_s:.1f} s); plot: {out / 'loss_curve.png'}")
    return summary


def plot_curves(curves: dict, path: Path, loss_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if curves["teacher_ce"] else 1, figsize=(10 if curves["teacher_ce"] else 5, 3.5))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    axes[0].plot(curves["distill"], color="C0")
    axes[0].set_title(f"student: {loss_name} loss")
    axes[0].set_xlabel("step")
    if curves["teacher_ce"]:
        axes[1].plot(curves["teacher_ce"], color="C1")
        axes[1].set_title("small teacher: cross-entropy")
        axes[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
