"""The training loop of ``ctalign distill``: :func:`distill`.

One step: a batch of examples (the first teacher's collator tokenizes both sides and aligns them; a
teacher cache supplies its own examples and rows), each teacher's rows (a forward pass of a live
teacher, or the cached ``TopK`` rows), the student's forward pass, the objective, backward, AdamW.
Held-out bits per byte of the student before, every ``eval_every`` steps and after; per-step metrics
in ``OUT/metrics.jsonl``; curves in ``OUT/curves.png``; the student (no byte head) in ``OUT/student``;
the report in ``OUT/report.json``. Under ``torchrun`` the student is wrapped in DDP (gloo on CPU) and
the losses reduce with ``global_mean``.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctalign.errors import CtalignError


@dataclass
class DistillConfig:
    student: str
    teachers: list[str] = field(default_factory=list)   # TEACHER[=WEIGHT]; none: plain fine-tuning (sft)
    loss: str = "likelihood"
    train: list[str] = field(default_factory=list)      # .txt / .jsonl (not needed with a teacher cache)
    eval: list[str] = field(default_factory=list)
    out: str = "distill-out"
    steps: int = 30
    batch_size: int = 4
    max_length: int = 128
    lr: float = 5e-5
    schedule: str = "cosine"                            # constant | linear | cosine, after a linear warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_k: int | None = 64
    ce_weight: float | None = None                      # the CE added to the distillation term (None: the loss's)
    eval_every: int = 0                                 # 0: before and after only
    eval_texts: int = 64
    seed: int = 0
    threads: int = 0
    on_policy: float = 0.0                              # share of steps whose responses the student samples
    on_policy_tokens: int = 32
    save: bool = True
    progress: bool = True
    fused: bool = False                                 # losses from hidden states + lm_head (no [B, L, V] logits)

    def check(self) -> None:
        from ctalign.train.objectives import LOSSES
        if self.loss not in LOSSES:
            raise CtalignError(f"unknown loss {self.loss!r} (known: {', '.join(LOSSES)})")
        if self.loss != "sft" and not self.teachers:
            raise CtalignError(f"the {self.loss} loss needs a --teacher (or use --loss sft)")
        for name in ("steps", "batch_size", "max_length", "eval_texts", "on_policy_tokens"):
            if getattr(self, name) < 1:
                raise CtalignError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CtalignError(f"learning rate must be positive, got {self.lr}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise CtalignError(f"schedule must be constant, linear or cosine, got {self.schedule!r}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise CtalignError(f"on-policy share must be within [0, 1], got {self.on_policy}")
        if self.ce_weight is not None and not (0.0 <= self.ce_weight < math.inf):
            raise CtalignError(f"ce-weight must be a finite number >= 0, got {self.ce_weight}")
        if self.fused and self.loss == "alm":
            raise CtalignError("the alm loss has no fused form (--fused)")
        if not self.eval:
            raise CtalignError("an evaluation file is needed (--eval): held-out bits per byte is the result")


def _lr_factor(cfg: DistillConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    done = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return max(0.0, 1.0 - done) if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def _eval_texts(cfg: DistillConfig) -> list[str]:
    from ctalign.cache.writer import read_examples
    texts = [ex.text for ex in read_examples(cfg.eval)]
    return texts[: cfg.eval_texts]


def _distributed():
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def distill(cfg: DistillConfig, *, return_student: bool = False):
    """Runs the distillation described by ``cfg``; returns the report (also written to OUT/report.json),
    or ``(report, student)`` with ``return_student`` (the trained :class:`~ctalign.train.students.Student`)."""
    import torch

    from ctalign.train import sampling
    from ctalign.train.evaluate import bits_per_byte
    from ctalign.train.objectives import Objective, byte_queries_for
    from ctalign.train.report import plot_curves, write_report
    from ctalign.train.sources import TeacherSource, parse_teacher_spec
    from ctalign.train.students import load_student, save_student

    cfg.check()
    rank, world = _distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    rng = random.Random(cfg.seed * 1000 + rank)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda m: print(f"distill: {m}", file=sys.stderr, flush=True)) if cfg.progress and rank == 0 else (lambda m: None)
    t_start = time.perf_counter()

    student = load_student(cfg.student, seed=cfg.seed)
    say(f"student {student.name} ({len(student.vocab):,} ids, "
        f"{sum(p.numel() for p in student.model.parameters()) / 1e6:.1f}M parameters)")
    # With sft the teachers only supply the data (a cache's examples): the same batches as every method.
    specs = [parse_teacher_spec(s) for s in cfg.teachers]
    total_w = sum(w for _, w in specs) or 1.0
    bq = byte_queries_for(cfg.loss)
    teachers = [TeacherSource(p, w / total_w, student.vocab, max_length=cfg.max_length, byte_queries=bq,
                              seed=cfg.seed, primary=(i == 0)) for i, (p, w) in enumerate(specs)]
    for t in teachers:
        say(f"teacher {t.name} ({len(t.vocab):,} ids, {'cache' if t.cache is not None else 'live'}, weight "
            f"{t.weight:.2f}): {t.amap.regime} regime")
    if cfg.on_policy and not all(t.live for t in teachers):
        raise CtalignError("on-policy training needs live teachers (a cache holds rows for its own texts only)")
    from ctalign.data import DistillationCollator
    primary = teachers[0] if teachers else None
    if primary is not None and primary.cache is not None:
        examples = None  # the cache's items
        n_examples = len(primary.cache)
    else:
        if not cfg.train:
            raise CtalignError("training data is needed (--train), or a teacher cache as the first --teacher")
        from ctalign.cache.writer import read_examples
        examples = read_examples(cfg.train)
        n_examples = len(examples)
    sft_collate = DistillationCollator(teacher_vocab=student.vocab, student_vocab=student.vocab,
                                       max_length=cfg.max_length) if primary is None else None
    held = _eval_texts(cfg)
    model = student.model
    model.train()
    forward = _LastHidden(model) if cfg.fused else model  # --fused: hidden states, the head in the loss
    ddp = forward
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(forward)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    objective = Objective(cfg.loss, student.vocab, temperature=cfg.temperature, top_k=cfg.top_k,
                          ce_weight=cfg.ce_weight, hidden_size=hidden_size, reduction="global_mean" if world > 1 else "mean",
                          student_head=model if cfg.fused else None)
    params = [p for p in model.parameters() if p.requires_grad] + objective.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    bpb = {"student_before": bits_per_byte(model, student.vocab, held, max_length=cfg.max_length)}
    for i, t in enumerate(teachers):
        if t.live and cfg.loss != "sft":
            bpb[f"teacher_{i}"] = bits_per_byte(t.model, t.vocab, held, max_length=cfg.max_length)
    say(f"held-out bits per byte: student {bpb['student_before']['bits_per_byte']:.4f}"
        + "".join(f", teacher {k[8:]} {v['bits_per_byte']:.4f}" for k, v in bpb.items() if k.startswith("teacher")))
    evals = [{"step": 0, "bits_per_byte": bpb["student_before"]["bits_per_byte"]}]
    metrics = open(out / "metrics.jsonl", "w") if rank == 0 else None
    bar = _progress(cfg, rank)
    times = {k: 0.0 for k in ("collate", "teacher", "student_forward", "loss", "backward", "optimizer", "sampling")}
    losses = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        picks = [rng.randrange(n_examples) for _ in range(cfg.batch_size)]
        on_policy = cfg.on_policy > 0 and rng.random() < cfg.on_policy
        if primary is not None and primary.cache is not None:
            batch = primary.collate([primary.cache[i] for i in picks])
        else:
            items = [examples[i] for i in picks]
            if on_policy:
                ts = time.perf_counter()
                items = sampling.continue_prompts(model, student.vocab, items, cfg.on_policy_tokens, rng)
                times["sampling"] += time.perf_counter() - ts
            docs = [{"prompt": ex.prompt, "response": ex.response} if not ex.whole_text else ex.text for ex in items]
            batch = (primary.collate if primary is not None else sft_collate)(docs)
        times["collate"] += time.perf_counter() - t0
        teacher_rows = []
        for i, t in enumerate(teachers if cfg.loss != "sft" else []):
            b = batch if i == 0 else _secondary_batch(t, batch)
            tc = time.perf_counter()
            rows, secs = t.rows_for(b)
            times["teacher"] += secs
            times["collate"] += time.perf_counter() - tc - secs
            teacher_rows.append((t.weight, rows))
        s_ids, s_att, s_mask = batch["student_input_ids"], batch["student_attention_mask"], batch["student_loss_mask"]
        ts = time.perf_counter()
        if cfg.fused:
            s_logits, hidden = None, ddp(input_ids=s_ids, attention_mask=s_att)
        else:
            output = ddp(input_ids=s_ids, attention_mask=s_att, output_hidden_states=cfg.loss == "bld")
            s_logits = output.logits
            hidden = output.hidden_states[-1] if cfg.loss == "bld" else None
        times["student_forward"] += time.perf_counter() - ts
        tl = time.perf_counter()
        loss = objective(s_logits, hidden, s_ids, s_mask, teacher_rows)
        if not torch.isfinite(loss):
            raise CtalignError(f"step {step}: the {cfg.loss} loss is {loss.item()} (not finite)")
        times["loss"] += time.perf_counter() - tl
        tb = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        times["backward"] += time.perf_counter() - tb
        to = time.perf_counter()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(cfg, step)
        opt.step()
        times["optimizer"] += time.perf_counter() - to
        losses.append(float(loss.item()))
        record = {"step": step + 1, "loss": losses[-1], "lr": opt.param_groups[0]["lr"], "on_policy": on_policy,
                  "seconds": time.perf_counter() - t0}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            e = bits_per_byte(model, student.vocab, held, max_length=cfg.max_length)["bits_per_byte"]
            evals.append({"step": step + 1, "bits_per_byte": e})
            record["eval_bits_per_byte"] = e
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        bar(step, losses[-1])
    bpb["student_after"] = bits_per_byte(model, student.vocab, held, max_length=cfg.max_length)
    evals.append({"step": cfg.steps, "bits_per_byte": bpb["student_after"]["bits_per_byte"]})
    if metrics is not None:
        metrics.close()
    report = {
        "config": asdict(cfg), "student": student.name, "teachers": [
            {"spec": t.spec, "name": t.name, "weight": t.weight, "regime": t.amap.regime,
             "source": "cache" if t.cache is not None else "live"} for t in teachers],
        "bits_per_byte": {k: v["bits_per_byte"] for k, v in bpb.items()}, "eval_bytes": bpb["student_before"]["bytes"],
        "eval_curve": evals, "final_loss": losses[-1], "steps": cfg.steps, "world_size": world,
        "seconds": {"total": time.perf_counter() - t_start, **{k: round(v, 3) for k, v in times.items()}},
        "seconds_per_step": sum(times.values()) / cfg.steps,
        "ctalign_share": (times["collate"] + times["loss"]) / max(sum(times.values()), 1e-9),
        "examples": n_examples,
    }
    if rank == 0:
        if cfg.save:
            report["saved_student"] = str(save_student(student, out))
        plot_curves(out / "metrics.jsonl", evals, out / "curves.png", cfg.loss)
        write_report(report, out)
    if world > 1:
        import gc

        import torch.distributed as dist
        del ddp  # the DDP reducer goes while its process group lives, not at interpreter exit
        gc.collect()
        dist.barrier()
    return (report, student) if return_student else report


def _last_hidden_module():
    import torch

    class LastHidden(torch.nn.Module):
        """The student's last hidden states (after its final norm): the base model's output, so that
        DDP wraps the whole model (the output layer's gradient comes from the fused loss)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
    return LastHidden


def _LastHidden(model):
    return _last_hidden_module()(model)


def _secondary_batch(t, batch: dict) -> dict:
    """A live teacher other than the first scores the first one's (already cut) texts."""
    docs = []
    for text, rs in zip(batch["texts"], batch["response_start"]):
        b = text.encode("utf-8")
        rs = min(rs, len(b))
        docs.append({"prompt": b[:rs].decode("utf-8"), "response": b[rs:].decode("utf-8")} if rs else text)
    b2 = t.collate(docs)
    import torch
    if not torch.equal(b2["student_input_ids"], batch["student_input_ids"]):
        raise CtalignError(f"teacher {t.name}: its collator tokenized the student side differently")
    return b2


def _progress(cfg: DistillConfig, rank: int):
    if not cfg.progress or rank != 0:
        return lambda step, loss: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return lambda step, loss: None
    bar = tqdm(total=cfg.steps, desc=f"distill ({cfg.loss})", dynamic_ncols=True, file=sys.stderr)

    def update(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step + 1 == cfg.steps:
            bar.close()
    return update
