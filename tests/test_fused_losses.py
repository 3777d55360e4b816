"""The fused losses (ctalign.losses.fused) against the unfused ones: the same value and the same
gradients with respect to the hidden states, the output layer's weight and bias (within 1e-5
relative in float32), for every loss, reduction, mask and head variant (bias, logit scaling,
soft-capping, a padded output layer), on real tokenizer pairs aligned by the collator; float64
gradcheck on a tiny head; bf16 within its precision; transformers heads (tied, Gemma's
soft-capping); DDP with ``global_mean``.
"""
from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import get_test_vocab  # noqa: E402

from ctalign import losses as L  # noqa: E402
from ctalign import ops  # noqa: E402
from ctalign.data import DistillationCollator  # noqa: E402
from ctalign.losses import fused as FZ  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    {"prompt": "Question: what is 12 + 30?\nAnswer:", "response": " It is 42, of course."},
    "Hello,  world!\n\tNumbers 12345, café, naïve, 日本語 and emoji 🙂.",
    ("User: say hi", " Hi there!   How are you doing today?\n    indented"),
]
H = 12
K_BYTES = 10
REDUCTIONS = ("mean", "sum", "none", "global_mean")
ROOT = Path(__file__).resolve().parents[1]
PACKAGE_PARENT = str(Path(__import__("ctalign").__file__).resolve().parents[1])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread (the machine's cores are shared; the loss calls here are small)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def case(teacher: str = "llama3", student: str = "mistral-v1"):
    from ctalign.alignment_map import build_map
    amap = build_map(get_test_vocab(teacher), get_test_vocab(student))
    b = DistillationCollator(amap, byte_queries=K_BYTES)(TEXTS)
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(*b["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 3
    return amap, b, tl, ops.topk_logprobs(tl, 48)


def make_head(V: int, variant: str, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    W = V + 5 if variant != "plain" else V  # a padded output layer: columns past V are ignored
    w = (torch.randn(W, H, generator=g) * 0.6).to(dtype).requires_grad_()
    bias = (torch.randn(W, generator=g) * 0.2).to(dtype).requires_grad_() if variant != "plain" else None
    if variant == "capped":
        return FZ.LMHead(w, bias, logit_scale=1.7, softcap=6.0)
    return FZ.LMHead(w, bias)


def make_hidden(b, dtype=torch.float32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    B, Ls = b["student_input_ids"].shape
    return (torch.randn(B, Ls, H, generator=g) * 1.5).to(dtype).requires_grad_()


def loss_pair(name: str, amap, b, tl, topk, byte_head=None):
    """(unfused(logits, reduction), fused(hidden, head, reduction, chunk_size)) of one loss setting."""
    ids, a, sm, tm = b["student_input_ids"], b["alignment"], b["student_loss_mask"], b["teacher_loss_mask"]
    Vs, Vt = amap.n_student, amap.n_teacher
    row_mask = torch.ones_like(sm)
    row_mask[:, 3::4] = False  # a user row mask
    if name == "ce":
        return (lambda x, r: L.cross_entropy(x, ids, mask=sm, vocab_size=Vs, reduction=r),
                lambda h, hd, r, c: FZ.cross_entropy_from_hidden(h, hd, ids, mask=sm, vocab_size=Vs, reduction=r,
                                                                 chunk_size=c))
    if name in ("likelihood", "likelihood_boundary_topk", "likelihood_dense", "likelihood_precomputed"):
        kw = {"likelihood": {}, "likelihood_boundary_topk": {"targets": "boundary", "top_k": 8},
              "likelihood_dense": {"top_k": None, "kl_weight": 0.5, "ce_weight": 0.5},
              "likelihood_precomputed": {"targets": L.likelihood_targets(tl, amap, a, student_width=ids.shape[1])}}[name]
        teacher = topk if name == "likelihood_boundary_topk" else tl
        return (lambda x, r: L.likelihood_distillation_loss(x, teacher, ids, a, amap, student_mask=sm, reduction=r, **kw),
                lambda h, hd, r, c: FZ.likelihood_loss_from_hidden(h, hd, teacher, ids, a, amap, student_mask=sm,
                                                                   reduction=r, chunk_size=c, **kw))
    if name in ("bpm", "bpm_drop_topk"):
        kw = {"ce_weight": 0.3} if name == "bpm" else {"residual": "drop", "row_mask": row_mask, "temperature": 1.5}
        teacher = tl if name == "bpm" else topk
        return (lambda x, r: L.bpm_loss(x, teacher, ids, a, amap, student_mask=sm, reduction=r, **kw),
                lambda h, hd, r, c: FZ.bpm_loss_from_hidden(h, hd, teacher, ids, a, amap, student_mask=sm, reduction=r,
                                                            chunk_size=c, **kw))
    if name in ("escd", "escd_topk"):
        kw = {"ce_weight": 0.2} if name == "escd" else {"child_weight": 0.5, "mask_whitespace": False}
        teacher = tl if name == "escd" else topk
        return (lambda x, r: L.escd_loss(x, teacher, ids, a, amap, student_mask=sm, reduction=r, **kw),
                lambda h, hd, r, c: FZ.escd_loss_from_hidden(h, hd, teacher, ids, a, amap, student_mask=sm, reduction=r,
                                                             chunk_size=c, **kw))
    if name in ("strict_kd", "strict_kd_all"):
        kw = {"ce_weight": 0.2, "row_mask": row_mask} if name == "strict_kd" else {"top_k": None, "mask_whitespace": True}
        return (lambda x, r: L.strict_kd_loss(x, tl, ids, a, amap, student_mask=sm, reduction=r, **kw),
                lambda h, hd, r, c: FZ.strict_kd_loss_from_hidden(h, hd, tl, ids, a, amap, student_mask=sm,
                                                                  reduction=r, chunk_size=c, **kw))
    if name.startswith("uld"):
        kw = {"uld": dict(align="byte", top_k=32, teacher_vocab_size=Vt),
              "uld_examples": dict(top_k=16, distance_mean="examples", ce_mask=sm, teacher_vocab_size=Vt),
              "uld_sparse": dict(align="byte", top_k=64, student_temperature=2.0),
              "uld_exact": dict(ce_weight=0.5)}[name]
        teacher = topk if name in ("uld_sparse", "uld_exact") else tl
        return (lambda x, r: L.uld_loss(x, teacher, ids, alignment=a, student_mask=sm, teacher_mask=tm,
                                        student_vocab_size=Vs, reduction=r, **kw),
                lambda h, hd, r, c: FZ.uld_loss_from_hidden(h, hd, teacher, ids, alignment=a, student_mask=sm,
                                                            teacher_mask=tm, student_vocab_size=Vs, reduction=r,
                                                            chunk_size=c, **kw))
    if name == "bld":
        hl = byte_head
        return (lambda x, r: L.byte_level_distillation_loss(x, hl, tl, ids, a, student_vocab=amap.student,
                                                            teacher_vocab=amap.teacher, student_mask=sm, reduction=r),
                lambda h, hd, r, c: FZ.bld_loss_from_hidden(h, hd, hl, tl, ids, a, student_vocab=amap.student,
                                                            teacher_vocab=amap.teacher, student_mask=sm, reduction=r,
                                                            chunk_size=c))
    raise KeyError(name)


LOSS_NAMES = ("ce", "likelihood", "likelihood_boundary_topk", "likelihood_dense", "likelihood_precomputed", "bpm",
              "bpm_drop_topk", "escd", "escd_topk", "strict_kd", "strict_kd_all", "uld", "uld_examples", "uld_sparse",
              "uld_exact", "bld")


def _backward(loss, reduction, params):
    for p in params:
        p.grad = None
    if reduction == "none":
        gw = torch.linspace(0.25, 1.75, loss.numel(), dtype=loss.dtype).view_as(loss)
        (loss * gw).sum().backward()
    else:
        (loss * 1.3).backward()
    return [p.grad.detach().clone() for p in params]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _compare(name, reduction, variant, chunk, dtype=torch.float32, tol=1e-5):
    amap, b, tl, topk = case()
    head = make_head(amap.n_student, variant, dtype)
    hidden = make_hidden(b, dtype)
    byte_head = None
    if name == "bld":
        g = torch.Generator().manual_seed(3)
        byte_head = (torch.randn(*hidden.shape[:2], K_BYTES, 257, generator=g)).requires_grad_()
    unfused, fused = loss_pair(name, amap, b, tl, topk, byte_head)
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else []) + (
        [byte_head] if byte_head is not None else [])
    ref = unfused(head.logits(hidden), reduction)
    g_ref = _backward(ref, reduction, params)
    out = fused(hidden, head, reduction, chunk)
    g_out = _backward(out, reduction, params)
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert float(ref.detach().abs().max()) > 0, name
    assert _rel(out.detach(), ref.detach()) <= tol, (name, reduction, float(out.sum()), float(ref.sum()))
    for what, x, y in zip(("hidden", "weight", "bias", "byte head"), g_out, g_ref):
        assert float(y.abs().max()) > 0, (name, what)
        assert _rel(x, y) <= tol, (name, reduction, what, _rel(x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_fused_equals_unfused_fp32(name, reduction):
    variant = ("capped", "bias", "plain")[LOSS_NAMES.index(name) % 3]
    chunk = (7, 32, None)[REDUCTIONS.index(reduction) % 3]
    _compare(name, reduction, variant, chunk)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    _compare("likelihood", "mean", "capped", chunk)
    _compare("escd" if chunk != 1 else "bpm", "none", "bias", chunk)


@pytest.mark.parametrize("name", ["ce", "likelihood", "bpm", "strict_kd", "uld"])
def test_fused_bf16_within_its_precision(name):
    """bf16 hidden states and head: the same loss as the unfused bf16 logits, within bf16's precision
    (the fused path accumulates the weight's gradient in float32, the unfused in one bf16 matmul)."""
    _compare(name, "mean", "capped", 16, dtype=torch.bfloat16, tol=3e-2)


def test_gradcheck_tiny_head_float64():
    """float64 gradcheck (hidden, weight, bias) of the fused Function through soft-capping, for CE,
    likelihood, BPM and strict KD on a tiny pair (botchan-bpe -> botchan-unigram, 1000 ids)."""
    amap = case("botchan-bpe", "botchan-unigram")[0]
    b = DistillationCollator(amap)(["Short one.", ("Q: who?", " Botchan, he said.")])
    ids, a, sm = b["student_input_ids"], b["alignment"], b["student_loss_mask"]
    g = torch.Generator().manual_seed(5)
    tl = (torch.randn(*b["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 2).double()
    h = (torch.randn(*ids.shape, 4, generator=g, dtype=torch.float64)).requires_grad_()
    w = (torch.randn(amap.n_student + 2, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    bias = (torch.randn(amap.n_student + 2, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    fns = {
        "ce": lambda hd, h_: FZ.cross_entropy_from_hidden(h_, hd, ids, mask=sm, vocab_size=amap.n_student,
                                                          chunk_size=3),
        "likelihood": lambda hd, h_: FZ.likelihood_loss_from_hidden(h_, hd, tl, ids, a, amap, student_mask=sm,
                                                                    chunk_size=3),
        "bpm": lambda hd, h_: FZ.bpm_loss_from_hidden(h_, hd, tl, ids, a, amap, student_mask=sm, ce_weight=0.3,
                                                      chunk_size=3),
        "strict_kd": lambda hd, h_: FZ.strict_kd_loss_from_hidden(h_, hd, tl, ids, a, amap, student_mask=sm,
                                                                  top_k=None, chunk_size=3),
    }
    for name, fn in fns.items():
        f = lambda h_, w_, b_: fn(FZ.LMHead(w_, b_, logit_scale=0.9, softcap=4.0), h_)  # noqa: E731
        assert f(h, w, bias).dtype == torch.float64
        assert torch.autograd.gradcheck(f, (h, w, bias), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True), name
    # 'none': the backward's second sweep
    f = lambda h_, w_, b_: FZ.cross_entropy_from_hidden(h_, FZ.LMHead(w_, b_), ids, mask=sm, reduction="none",  # noqa
                                                        vocab_size=amap.n_student, chunk_size=4)
    assert torch.autograd.gradcheck(f, (h, w, bias), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_fused_student_head_wraps_loss_modules():
    amap, b, tl, topk = case()
    ids, a, sm, tm = b["student_input_ids"], b["alignment"], b["student_loss_mask"], b["teacher_loss_mask"]
    head = make_head(amap.n_student, "bias")
    lin = torch.nn.Linear(H, head.width)
    with torch.no_grad():
        lin.weight.copy_(head.weight)
        lin.bias.copy_(head.bias)
    hidden = make_hidden(b)
    x = head.logits(hidden)
    mods = [
        (L.LikelihoodDistillationLoss(amap, top_k=16), (tl, ids, a, sm)),
        (L.BPMLoss(amap, ce_weight=0.1, reduction="sum"), (tl, ids, a, sm)),
        (L.ESCDLoss(amap), (topk, ids, a, sm)),
        (L.StrictAlignmentKDLoss(amap, ce_weight=0.2), (tl, ids, a, sm)),
        (L.ULDLoss(align="byte", top_k=32, student_vocab_size=amap.n_student), (topk, ids, a, sm, tm)),
    ]
    for m, args in mods:
        ref = m(x, *args)
        for hd in (head, lin):
            out = FZ.FusedStudentHead(hd, m, chunk_size=13)(hidden, *args)
            assert _rel(out.detach(), ref.detach()) <= 1e-5, type(m).__name__
    ce = FZ.FusedStudentHead(lin)(hidden, ids, sm, vocab_size=amap.n_student)
    assert _rel(ce.detach(), L.cross_entropy(x, ids, mask=sm, vocab_size=amap.n_student).detach()) <= 1e-5
    with pytest.raises(TypeError, match="no fused form"):
        FZ.FusedStudentHead(head, torch.nn.MSELoss())(hidden, ids)


def test_empty_targets_are_a_connected_zero():
    amap, b, tl, _ = case()
    ids, a = b["student_input_ids"], b["alignment"]
    head, hidden = make_head(amap.n_student, "bias"), make_hidden(b)
    none = torch.zeros_like(b["student_loss_mask"])
    for red in ("mean", "sum", "none"):
        out = FZ.likelihood_loss_from_hidden(hidden, head, tl, ids, a, amap, student_mask=none, reduction=red)
        assert float(out.detach().abs().sum()) == 0.0
        out.sum().backward()
        assert float(hidden.grad.abs().sum()) == 0.0 and float(head.weight.grad.abs().sum()) == 0.0
        hidden.grad = head.weight.grad = head.bias.grad = None


def test_errors_name_the_problem():
    amap, b, tl, _ = case()
    ids = b["student_input_ids"]
    hidden = make_hidden(b)
    small = FZ.LMHead(torch.randn(100, H))
    with pytest.raises(ValueError, match="fewer than"):
        FZ.cross_entropy_from_hidden(hidden, small, ids, vocab_size=amap.n_student)
    with pytest.raises(ValueError, match="hidden size"):
        FZ.cross_entropy_from_hidden(hidden[..., :5], make_head(amap.n_student, "plain"), ids)
    with pytest.raises(ValueError, match="softcap"):
        FZ.LMHead(torch.randn(4, 2), softcap=-1.0)


def test_lmhead_of_transformers_models_tied_and_softcapped():
    """LMHead.of reads the output layer as the model applies it: Gemma-2 (tied embeddings,
    final_logit_softcapping) and Llama (untied); the fused CE from the base model's hidden states
    equals the CE of model(...).logits, with the same gradients on every parameter."""
    transformers = pytest.importorskip("transformers")
    configs = [
        transformers.Gemma2Config(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  final_logit_softcapping=3.0, tie_word_embeddings=True),
        transformers.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False),
    ]
    for cfg in configs:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
        head = FZ.LMHead.of(model)
        if isinstance(cfg, transformers.Gemma2Config):
            assert head.softcap == 3.0 and head.weight is model.get_input_embeddings().weight
        ids = torch.randint(0, 300, (2, 9))
        ref = L.cross_entropy(model(input_ids=ids).logits, ids, vocab_size=300)
        ref.backward()
        g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        hidden = model.base_model(input_ids=ids)[0]
        out = FZ.cross_entropy_from_hidden(hidden, head, ids, vocab_size=300, chunk_size=5)
        out.backward()
        assert _rel(out.detach(), ref.detach()) <= 1e-5
        for n, p in model.named_parameters():
            assert _rel(p.grad, g_ref[n]) <= 1e-4, n


# ---- DDP --------------------------------------------------------------------------------------------
DDP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    ("Question: who is the hero?", " Botchan, a reckless young man from Tokyo."),
    "He went to the country to teach mathematics at a middle school.",
    ("Q: and then?", " He quarrelled with almost everybody."),
    "Short one.",
]
DDP_LOSSES = ("ce", "likelihood", "bpm", "escd", "strict_kd", "uld")
SHARDS = ([0, 1], [2, 3, 4])


class _Body(torch.nn.Module):
    def __init__(self, vocab_size: int, hidden: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, vocab_size)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return h + torch.cumsum(h, 1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]


def _ddp_loss(name, model, head, batch, rows, tl, amap, reduction, fused):
    ids, a = batch["student_input_ids"][rows], batch["alignment"].select(rows)
    sm, tm, t = batch["student_loss_mask"][rows], batch["teacher_loss_mask"][rows], tl[rows]
    hidden = model(ids)
    hd = FZ.LMHead(head.weight, head.bias, softcap=5.0)
    if not fused:
        x = hd.logits(hidden)
    f = {"ce": (lambda: FZ.cross_entropy_from_hidden(hidden, hd, ids, mask=sm, reduction=reduction, chunk_size=8),
                lambda: L.cross_entropy(x, ids, mask=sm, reduction=reduction)),
         "likelihood": (lambda: FZ.likelihood_loss_from_hidden(hidden, hd, t, ids, a, amap, student_mask=sm,
                                                               reduction=reduction, chunk_size=8),
                        lambda: L.likelihood_distillation_loss(x, t, ids, a, amap, student_mask=sm, reduction=reduction)),
         "bpm": (lambda: FZ.bpm_loss_from_hidden(hidden, hd, t, ids, a, amap, student_mask=sm, ce_weight=0.1,
                                                 reduction=reduction, chunk_size=8),
                 lambda: L.bpm_loss(x, t, ids, a, amap, student_mask=sm, ce_weight=0.1, reduction=reduction)),
         "escd": (lambda: FZ.escd_loss_from_hidden(hidden, hd, t, ids, a, amap, student_mask=sm, ce_weight=0.1,
                                                   reduction=reduction, chunk_size=8),
                  lambda: L.escd_loss(x, t, ids, a, amap, student_mask=sm, ce_weight=0.1, reduction=reduction)),
         "strict_kd": (lambda: FZ.strict_kd_loss_from_hidden(hidden, hd, t, ids, a, amap, student_mask=sm,
                                                             ce_weight=0.1, reduction=reduction, chunk_size=8),
                       lambda: L.strict_kd_loss(x, t, ids, a, amap, student_mask=sm, ce_weight=0.1, reduction=reduction)),
         "uld": (lambda: FZ.uld_loss_from_hidden(hidden, hd, t, ids, alignment=a, student_mask=sm, teacher_mask=tm,
                                                 align="byte", top_k=64, reduction=reduction, chunk_size=8),
                 lambda: L.uld_loss(x, t, ids, alignment=a, student_mask=sm, teacher_mask=tm, align="byte", top_k=64,
                                    reduction=reduction))}[name]
    return f[0]() if fused else f[1]()


class _Whole(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, ids):
        return self.body(ids)


def ddp_worker(out_path: str) -> None:
    import copy
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ctalign import assets, build_map, load_vocab

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    amap = build_map(load_vocab(assets.path("botchan-bpe")), load_vocab(assets.path("botchan-unigram")))
    batch = DistillationCollator(amap)(DDP_TEXTS)
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(*batch["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 2
    report = {}
    for name in DDP_LOSSES:
        torch.manual_seed(1)
        body = _Body(amap.n_student)
        ref = copy.deepcopy(body)
        ref_loss = _ddp_loss(name, ref, ref.out, batch, list(range(len(DDP_TEXTS))), tl, amap, "mean", fused=False)
        ref_loss.backward()
        ddp = DDP(_Whole(copy.deepcopy(body)))
        loss = _ddp_loss(name, ddp, ddp.module.body.out, batch, SHARDS[rank], tl, amap, "global_mean", fused=True)
        loss.backward()
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        avg /= world
        diffs = [float((p.grad - q.grad).abs().max()) for p, q in zip(ddp.module.body.parameters(), ref.parameters())]
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
def test_ddp_fused_global_mean_equals_single_process_unfused(tmp_path):
    """torchrun, 2 ranks (gloo), uneven shards: the fused losses with reduction='global_mean' under
    DDP give the gradients of the unfused losses' 'mean' over the whole batch in one process."""
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
    assert set(report) == set(DDP_LOSSES)
    for name, r in report.items():
        assert r["grad_scale"] > 0, name
        assert r["max_grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), (name, r)
        assert abs(r["loss_single"] - r["loss_ddp_avg"]) <= 1e-5 * max(1.0, abs(r["loss_single"])), (name, r)


if __name__ == "__main__":
    ddp_worker(sys.argv[1])


# ---- ctalign distill --fused ------------------------------------------------------------------------
def test_distill_objective_fused_equals_unfused():
    """The training objective with a student head (``--fused``) gives the unfused objective's loss and
    gradients, for every loss that has a fused form."""
    from ctalign.train.objectives import Objective, TeacherBatch
    amap, b, tl, _ = case()
    tb = TeacherBatch(tl, b["teacher_input_ids"], b["teacher_loss_mask"], b["alignment"], amap=amap,
                      vocab=amap.teacher)
    ids, sm = b["student_input_ids"], b["student_loss_mask"]
    for loss in ("sft", "likelihood", "uld", "bld", "bpm", "escd", "strict_kd"):
        head, hidden = make_head(amap.n_student, "capped"), make_hidden(b)
        params = [hidden, head.weight, head.bias]
        torch.manual_seed(0)
        ref_obj = Objective(loss, amap.student, hidden_size=H)
        torch.manual_seed(0)
        obj = Objective(loss, amap.student, hidden_size=H, student_head=head)
        ref = ref_obj(head.logits(hidden), hidden, ids, sm, [(0.7, tb), (0.3, tb)])
        g_ref = _backward(ref, "mean", params)
        out = obj(None, hidden, ids, sm, [(0.7, tb), (0.3, tb)])
        g_out = _backward(out, "mean", params)
        assert _rel(out.detach(), ref.detach()) <= 1e-5, loss
        for x, y in zip(g_out, g_ref):
            assert _rel(x, y) <= 1e-5, loss
    with pytest.raises(ValueError, match="no fused form"):
        Objective("alm", amap.student, student_head=head)


def test_distill_fused_runs_a_step(tmp_path):
    """``ctalign distill --fused`` end to end (scratch Llama student, plain fine-tuning, 2 steps): the
    hidden states + lm_head path trains and reports."""
    pytest.importorskip("transformers")
    from ctalign import assets
    from ctalign.errors import CtalignError
    from ctalign.train import DistillConfig, distill
    kw = dict(student="scratch:asset:botchan-unigram:d=32,layers=1,heads=2", loss="sft",
              train=[str(assets.path("shakespeare-hamlet"))], eval=[str(assets.path("botchan-text"))],
              steps=2, batch_size=2, max_length=24, eval_texts=2, lr=1e-3, progress=False, threads=1, save=False)
    rep = distill(DistillConfig(out=str(tmp_path / "f"), fused=True, **kw))
    ref = distill(DistillConfig(out=str(tmp_path / "u"), **kw))
    assert rep["final_loss"] > 0
    assert abs(rep["final_loss"] - ref["final_loss"]) <= 1e-4 * ref["final_loss"]
    with pytest.raises(CtalignError, match="no fused form"):
        distill(DistillConfig(out=str(tmp_path / "a"), fused=True, **{**kw, "loss": "alm", "teachers": ["x"]}))


@pytest.mark.parametrize("loss", ["uld", "likelihood", "ce"])
def test_example_distill_fused_matches_unfused(loss, tmp_path):
    """examples/distill.py --fused (TinyGPT's tied output layer): the same training curve as without."""
    pytest.importorskip("matplotlib")
    import importlib.util
    spec = importlib.util.spec_from_file_location("ctalign_example_distill_fused", ROOT / "examples" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    quick = ["--loss", loss, "--steps", "2", "--teacher-steps", "2", "--batch-size", "3", "--max-length", "32",
             "--eval-texts", "2", "--chunk-chars", "100", "--no-progress", "--threads", "1"]
    a = mod.main(quick + ["--out", str(tmp_path / "u")])
    b = mod.main(quick + ["--out", str(tmp_path / "f"), "--fused"])
    assert abs(a["final_loss"] - b["final_loss"]) <= 1e-4 * abs(a["final_loss"])
    assert abs(a["bits_per_byte"]["student_after"] - b["bits_per_byte"]["student_after"]) <= 1e-4
