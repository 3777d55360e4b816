"""The losses under DistributedDataParallel: a ``torchrun --nproc_per_node 2`` job (gloo, CPU) gives
the same gradients as one process that sees the whole batch.

Run by pytest, this file starts ``torch.distributed.run`` on itself; each rank takes an uneven
shard of one batch of real tokenizations (botchan-bpe teacher, botchan-unigram student), wraps a
small student (and, for BLD, its ByteHead) in DDP and computes every loss with
``reduction='global_mean'``; rank 0 compares the averaged gradients with the single-process gradients
of ``reduction='mean'`` over the whole batch.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the same ctalign as this process: the installed one in CI, the working tree
# (PYTHONPATH=python) in development.
PACKAGE_PARENT = str(Path(__import__("ctalign").__file__).resolve().parents[1])
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    ("Question: who is the hero?", " Botchan, a reckless young man from Tokyo."),
    "He went to the country to teach mathematics at a middle school.",
    ("Q: and then?", " He quarrelled with almost everybody."),
    "Short one.",
]
LOSSES = ("uld", "bld", "likelihood", "alm", "bpm", "escd", "strict_kd")
SHARDS = ([0, 1], [2, 3, 4])  # uneven on purpose


class Student(torch.nn.Module):
    def __init__(self, vocab_size: int, hidden: int = 16, with_head: bool = False):
        super().__init__()
        from ctalign.losses import ByteHead
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, vocab_size)
        self.head = ByteHead(hidden, 10) if with_head else None

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        h = h + torch.cumsum(h, 1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]  # causal mixing
        return self.out(h), (self.head(h) if self.head is not None else None)


def compute_loss(name, model, batch, rows, teacher_logits, amap, reduction):
    from ctalign import losses as L
    ids = batch["student_input_ids"][rows]
    a = batch["alignment"].select(rows)
    sm, tm = batch["student_loss_mask"][rows], batch["teacher_loss_mask"][rows]
    t = teacher_logits[rows]
    logits, head = model(ids)
    if name == "uld":
        return L.ULDLoss(align="byte", top_k=64, reduction=reduction)(logits, t, ids, a, sm, tm)
    if name == "bld":
        return L.ByteLevelDistillationLoss(amap.student, amap.teacher, reduction=reduction)(logits, head, t, ids, a, sm)
    if name == "likelihood":
        return L.LikelihoodDistillationLoss(amap, reduction=reduction)(logits, t, ids, a, sm)
    if name == "bpm":
        return L.BPMLoss(amap, ce_weight=0.1, reduction=reduction)(logits, t, ids, a, sm)
    if name == "escd":
        return L.ESCDLoss(amap, ce_weight=0.1, reduction=reduction)(logits, t, ids, a, sm)
    if name == "strict_kd":
        return L.StrictAlignmentKDLoss(amap, ce_weight=0.1, reduction=reduction)(logits, t, ids, a, sm)
    return L.ApproximateLikelihoodMatchingLoss(tau=10.0, debias=True, student_vocab=amap.student,
                                              teacher_vocab=amap.teacher, reduction=reduction)(
        logits, t, ids, batch["teacher_input_ids"][rows], a, sm, tm)


def worker(out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ctalign import assets, build_map, load_vocab
    from ctalign.data import DistillationCollator

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    torch.set_num_threads(1)
    amap = build_map(load_vocab(assets.path("botchan-bpe")), load_vocab(assets.path("botchan-unigram")))
    batch = DistillationCollator(amap, byte_queries=10)(TEXTS)
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(*batch["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 2
    all_rows = list(range(len(TEXTS)))
    report = {}
    for name in LOSSES:
        torch.manual_seed(1)
        model = Student(amap.n_student, with_head=name == "bld")
        ref = copy.deepcopy(model)
        ref_loss = compute_loss(name, ref, batch, all_rows, teacher_logits, amap, "mean")
        ref_loss.backward()
        ddp = DDP(copy.deepcopy(model))
        loss = compute_loss(name, ddp, batch, SHARDS[rank], teacher_logits, amap, "global_mean")
        loss.backward()
        # the ranks' loss values average to the global mean
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        avg /= world
        diffs = [float((p.grad - q.grad).abs().max()) for p, q in zip(ddp.module.parameters(), ref.parameters())]
        scale = max(float(q.grad.abs().max()) for q in ref.parameters())
        report[name] = {"max_grad_diff": max(diffs), "grad_scale": scale, "loss_single": float(ref_loss),
                        "loss_ddp_avg": float(avg)}
        del ddp, loss  # each DDP's reducer freed while its process group lives (not at interpreter exit)
        gc.collect()
    if rank == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT, str(ROOT / "tests")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == set(LOSSES)
    for name, r in report.items():
        assert r["max_grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), (name, r)
        assert r["grad_scale"] > 0, name
        assert abs(r["loss_single"] - r["loss_ddp_avg"]) <= 1e-5 * max(1.0, abs(r["loss_single"])), (name, r)


def test_global_mean_is_mean_without_a_process_group():
    from ctalign import assets, build_map, load_vocab
    from ctalign.data import DistillationCollator
    amap = build_map(load_vocab(assets.path("botchan-bpe")), load_vocab(assets.path("botchan-unigram")))
    batch = DistillationCollator(amap, byte_queries=10)(TEXTS)
    teacher_logits = torch.randn(*batch["teacher_input_ids"].shape, amap.n_teacher)
    rows = list(range(len(TEXTS)))
    for name in LOSSES:
        torch.manual_seed(1)
        model = Student(amap.n_student, with_head=name == "bld")
        a = compute_loss(name, model, batch, rows, teacher_logits, amap, "mean")
        b = compute_loss(name, model, batch, rows, teacher_logits, amap, "global_mean")
        assert torch.equal(a, b), name


if __name__ == "__main__":
    worker(sys.argv[1])
