"""BPM, ESCD, strict-alignment KD and the row masks (ctalign.losses.bpm / escd / strict_kd / row_masks)
on real tokenizer pairs of different families: qwen -> llama3 and mistral-v1 -> llama3 (general),
llama3 -> mistral-v1 (a student that splits the teacher's tokens: ESCD's child states),
llama3 -> its shrunk student (subset), botchan-bpe -> botchan-unigram (small, for gradcheck).
Every value is compared with a float64 brute-force definition written here (loops over the
vocabularies by bytes; no tries)."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import get_test_vocab  # noqa: E402
from _brute_force import SequenceMasses, byte_sequences, softmax64, student_target_of_no_bytes  # noqa: E402

from ctalign import losses as L  # noqa: E402
from ctalign.data import DistillationCollator  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return  x + 12345\n\tpass\n",
    ("Question: what is 12 + 30?", " It is 42, of course. Café naïve, 日本語 🙂."),
    "Numbers 1234567 and    spaces\t\ttabs.",
]


@functools.lru_cache(maxsize=None)
def vocab(name: str):
    if name.endswith("-shrunk"):
        import tempfile
        from ctalign import load_vocab
        from ctalign.shrink import shrink_vocab
        base = name[: -len("-shrunk")]
        d = tempfile.mkdtemp(prefix=f"ctalign-{base}-")
        shrink_vocab(get_test_vocab(base), 2500, d)
        return load_vocab(d, name=name)
    return get_test_vocab(name)


@functools.lru_cache(maxsize=None)
def get_map(teacher: str, student: str):
    from ctalign.alignment_map import build_map
    return build_map(vocab(teacher), vocab(student))


@functools.lru_cache(maxsize=None)
def batch(teacher: str, student: str):
    return DistillationCollator(get_map(teacher, student))(TEXTS)


def logits(b, side: str, width: int, seed: int, dtype=torch.float32, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    B, Lx = b[f"{side}_input_ids"].shape
    return (torch.randn(B, Lx, width, generator=g) * scale).to(dtype)


@functools.lru_cache(maxsize=None)
def brute_groups(teacher: str, student: str) -> np.ndarray:
    """The BPM group of every teacher id, by a loop over the teacher vocabulary: the smallest student
    id of the longest student byte string that prefixes the token's bytes; specials as dec_S's."""
    t, s, amap = vocab(teacher), vocab(student), get_map(teacher, student)
    by_bytes: dict[bytes, int] = {}
    for i in range(len(s)):
        bs = s.token_bytes(i)
        if bs is not None:
            by_bytes.setdefault(bs, i)
    no_bytes = student_target_of_no_bytes(amap, t, s)
    out = np.full(len(t), len(s), dtype=np.int64)
    for i in range(len(t)):
        bt = t.token_bytes(i)
        if bt is None:
            out[i] = no_bytes[i]
            continue
        for n in range(len(bt), 0, -1):
            if bt[:n] in by_bytes:
                out[i] = by_bytes[bt[:n]]
                break
    return out


PAIRS = [("qwen", "llama3"), ("mistral-v1", "llama3"), ("llama3", "llama3-shrunk")]


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_bpm_target_equals_brute_force(teacher, student):
    amap, b = get_map(teacher, student), batch(teacher, student)
    a = b["alignment"]
    tl = logits(b, "teacher", amap.n_teacher, 0, dtype=torch.float64)
    tg = L.bpm_targets(tl, amap, a)
    assert tg.logprobs.dtype == torch.float64
    groups = brute_groups(teacher, student)
    Vs = amap.n_student
    qb, qj = torch.nonzero(tg.valid, as_tuple=True)
    assert qb.numel() >= 20
    for r in range(0, qb.numel(), max(1, qb.numel() // 12)):
        bb, j = int(qb[r]), int(qj[r])
        k1 = int(a.s_teacher_row[bb, j])
        p = softmax64(tl[bb, k1].numpy(), amap.n_teacher)
        q = np.zeros(Vs + 1)
        np.add.at(q, groups, p)
        got = tg.logprobs[bb, j].numpy()
        assert np.allclose(np.exp(got), q, atol=1e-12, rtol=1e-9)
        assert np.array_equal(np.isfinite(got), q > 0)
    # rows sum to 1 (float32 kernels too)
    tg32 = L.bpm_targets(tl.float(), amap, a)
    sums = tg32.logprobs[tg32.valid].double().exp().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=2e-6)
    # where no target: all -inf; targets only at teacher boundaries
    assert not torch.isfinite(tg.logprobs[~tg.valid]).any()
    assert not (tg.valid & ~a.s_at_boundary).any()


@pytest.mark.parametrize("teacher,student", [("qwen", "llama3"), ("llama3", "llama3-shrunk")])
def test_bpm_exact_and_lower_bound_labels(teacher, student):
    """exact <=> the realised student token's bytes lie within the teacher token that starts there."""
    amap, b = get_map(teacher, student), batch(teacher, student)
    a = b["alignment"]
    t, s = vocab(teacher), vocab(student)
    tg = L.bpm_targets(logits(b, "teacher", amap.n_teacher, 1), amap, a)
    n_exact = n_lower = 0
    for bb, j in torch.nonzero(tg.valid).tolist():
        sid, tid = int(a.student_ids[bb, j]), int(a.teacher_ids[bb, int(a.s_teacher_token[bb, j])])
        sb, tb = s.token_bytes(sid), t.token_bytes(tid)
        within = sb is None or (tb is not None and tb.startswith(sb))
        assert bool(tg.exact[bb, j]) == within, (bb, j, sb, tb)
        n_exact += within
        n_lower += not within
    assert n_exact > 0
    if teacher == "qwen":  # qwen splits digits one by one, llama3 into threes: student tokens that cross
        assert n_lower > 0
    else:  # subset regime: every student token lies inside one teacher token
        assert n_lower == 0


def _student_kl_reference(tgt_lp: np.ndarray, s_logits: np.ndarray, amap, pg, T=1.0):
    """KL(target || student on BPM's columns), float64, by loops over the student vocabulary."""
    Vs = amap.n_student
    ps = softmax64(s_logits, Vs, T)
    cols = np.zeros(Vs + 1)
    np.add.at(cols, pg.student_group.astype(np.int64), ps)
    q = np.exp(tgt_lp)
    m = q > 0
    return float((q[m] * (tgt_lp[m] - np.log(cols[m]))).sum())


def test_bpm_loss_equals_reference_kl():
    amap, b = get_map("qwen", "llama3"), batch("qwen", "llama3")
    a = b["alignment"]
    from ctalign.prefix_groups import prefix_groups
    pg = prefix_groups(amap)
    tl = logits(b, "teacher", amap.n_teacher, 2)
    sl = logits(b, "student", amap.n_student, 3)
    ids = b["student_input_ids"]
    T = 1.5
    per = L.bpm_loss(sl, tl, ids, a, amap, reduction="none", temperature=T, mask_whitespace=False)
    tg = L.bpm_targets(tl.double(), amap, a, temperature=T)
    valid = tg.valid.clone()
    valid[:, 0] = False
    for bb, j in torch.nonzero(valid).tolist()[::6]:
        ref = _student_kl_reference(tg.logprobs[bb, j].numpy(), sl[bb, j - 1].double().numpy(), amap, pg, T)
        assert per[bb, j].item() == pytest.approx(ref, rel=2e-4, abs=2e-5)
    assert torch.all(per[~valid] == 0)
    mean = L.bpm_loss(sl, tl, ids, a, amap, temperature=T, mask_whitespace=False)
    assert mean.item() == pytest.approx(per.sum().item() / int(valid.sum()), rel=1e-5)
    # module twin
    mod = L.BPMLoss(amap, temperature=T, mask_whitespace=False)
    assert mod(sl, tl, ids, a).item() == pytest.approx(mean.item(), rel=1e-6)


def test_whitespace_row_mask_and_user_row_mask():
    amap, b = get_map("qwen", "llama3"), batch("qwen", "llama3")
    a, ids = b["alignment"], b["student_input_ids"]
    s = vocab("llama3")
    ws = L.whitespace_tokens(amap)
    ref = np.array([bool(x) and set(x) <= {0x20, 0x09} for x in (s.token_bytes(i) for i in range(len(s)))])
    assert np.array_equal(ws, ref)
    keep = L.whitespace_row_mask(ids, amap)
    assert (~keep).sum() > 0  # the texts hold runs of spaces and tabs
    tl, sl = logits(b, "teacher", amap.n_teacher, 4), logits(b, "student", amap.n_student, 5)
    on = L.bpm_loss(sl, tl, ids, a, amap, reduction="none")
    off = L.bpm_loss(sl, tl, ids, a, amap, reduction="none", mask_whitespace=False)
    assert torch.all(on[~keep] == 0) and torch.any(off[~keep] != 0)
    assert torch.allclose(on[keep], off[keep], rtol=1e-6, atol=1e-7)
    user = torch.ones_like(keep)
    user[:, 5:] = False
    got = L.bpm_loss(sl, tl, ids, a, amap, reduction="none", row_mask=user, mask_whitespace=False)
    assert torch.all(got[:, 5:] == 0) and torch.allclose(got[:, :5], off[:, :5], rtol=1e-6, atol=1e-7)
    assert torch.equal(L.combine_row_masks(None, keep, user), keep & user)
    with pytest.raises(ValueError, match="row_mask"):
        L.bpm_loss(sl, tl, ids, a, amap, row_mask=user[:, :3])


def _prefix_mass(p_student: np.ndarray, student) -> SequenceMasses:
    return SequenceMasses(p_student, byte_sequences(student))


@pytest.mark.parametrize("teacher,student", [("llama3", "mistral-v1"), ("llama3", "llama3-shrunk")])
def test_escd_child_term_equals_brute_force(teacher, student):
    amap, b = get_map(teacher, student), batch(teacher, student)
    a, ids = b["alignment"], b["student_input_ids"]
    t, s = vocab(teacher), vocab(student)
    tl = logits(b, "teacher", amap.n_teacher, 6, scale=2.0)
    sl = logits(b, "student", amap.n_student, 7, scale=2.0)
    child = L.escd_child_term(sl, tl, ids, a, amap, mask_whitespace=False)
    assert child.rows.sum() >= 3
    groups = brute_groups(teacher, student)
    s_bytes = byte_sequences(s)
    rep: dict[bytes, int] = {}
    for i, x in enumerate(s_bytes):
        if x:
            rep.setdefault(x, i)
    checked = 0
    for bb, j in torch.nonzero(child.rows).tolist()[:6]:
        sid = int(ids[bb, j])
        g = rep[s_bytes[sid]]
        gl = len(s_bytes[g])
        p = softmax64(tl[bb, int(a.s_teacher_row[bb, j])].numpy(), amap.n_teacher)
        masses = _prefix_mass(softmax64(sl[bb, j].numpy(), amap.n_student), s)
        ref, covered = 0.0, 0.0
        for tt in np.nonzero(groups == g)[0]:
            tb = t.token_bytes(int(tt))
            if tb is None or len(tb) <= gl:
                continue
            c = masses.mass.get(tb[gl:], 0.0)  # sum over student tokens whose bytes start with r
            if c > 0:
                ref -= p[tt] * math.log(c)
                covered += p[tt]
        assert child.values[bb, j].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
        assert child.covered_mass[bb, j].item() == pytest.approx(covered, rel=1e-4, abs=1e-7)
        checked += 1
    assert checked >= 3
    # the loss: root + child, both averaged over the root positions
    root = L.bpm_loss(sl, tl, ids, a, amap, mask_whitespace=False, reduction="sum")
    n_root = int(L.bpm_loss(sl, tl, ids, a, amap, mask_whitespace=False, reduction="none").ne(0).sum())
    esc = L.escd_loss(sl, tl, ids, a, amap, mask_whitespace=False, reduction="sum")
    assert esc.item() == pytest.approx(root.item() + child.values.sum().item(), rel=1e-5)
    mean = L.escd_loss(sl, tl, ids, a, amap, mask_whitespace=False)
    assert mean.item() == pytest.approx(esc.item() / n_root, rel=1e-3)
    mod = L.ESCDLoss(amap, mask_whitespace=False, child_weight=0.5)
    half = L.escd_loss(sl, tl, ids, a, amap, mask_whitespace=False, child_weight=0.5)
    assert mod(sl, tl, ids, a).item() == pytest.approx(half.item(), rel=1e-6)


def test_escd_topk_teacher_rows_use_the_kept_entries():
    from ctalign import ops
    amap, b = get_map("llama3", "mistral-v1"), batch("llama3", "mistral-v1")
    a, ids = b["alignment"], b["student_input_ids"]
    tl = logits(b, "teacher", amap.n_teacher, 8, scale=2.0)
    sl = logits(b, "student", amap.n_student, 9, scale=2.0)
    dense = L.escd_child_term(sl, tl, ids, a, amap)
    sparse = L.escd_child_term(sl, ops.topk_logprobs(tl, amap.n_teacher), ids, a, amap)
    assert torch.allclose(dense.values, sparse.values, rtol=1e-4, atol=1e-6)
    assert torch.equal(dense.rows, sparse.rows)
    k = L.escd_child_term(sl, ops.topk_logprobs(tl, 64), ids, a, amap)
    assert torch.all(k.covered_mass <= dense.covered_mass + 1e-6)


@functools.lru_cache(maxsize=None)
def _string_ids(teacher: str, student: str):
    """Per id of each side, the index of its byte string among the strings of both vocabularies
    (-1 for ids without bytes), and how many strings are shared."""
    t, s = vocab(teacher), vocab(student)
    index: dict[bytes, int] = {}
    sides = []
    for v in (t, s):
        ids = np.full(len(v), -1, dtype=np.int64)
        for i in range(len(v)):
            x = v.token_bytes(i)
            if x is not None:
                ids[i] = index.setdefault(x, len(index))
        sides.append(ids)
    shared = np.zeros(len(index), dtype=bool)
    shared[np.intersect1d(sides[0][sides[0] >= 0], sides[1][sides[1] >= 0])] = True
    return sides[0], sides[1], shared


def _shared_reference(t_logits, s_logits, teacher, student, top_k, T=1.0):
    """Reverse KL on the shared vocabulary (byte strings of both), renormalised over the student's
    top k strings; float64, each side's mass of a string summed over its ids."""
    t_ids, s_ids, shared = _string_ids(teacher, student)
    pt, ps = softmax64(t_logits, len(t_ids), T), softmax64(s_logits, len(s_ids), T)
    mt, ms = np.zeros(len(shared)), np.zeros(len(shared))
    np.add.at(mt, t_ids[t_ids >= 0], pt[t_ids >= 0])
    np.add.at(ms, s_ids[s_ids >= 0], ps[s_ids >= 0])
    cand = np.nonzero(shared)[0]
    top = cand[np.argsort(-ms[cand], kind="stable")[:top_k]] if top_k else cand
    q, p = ms[top] / ms[top].sum(), np.maximum(mt[top], 1e-12)
    p = p / p.sum()
    return float((q * (np.log(q) - np.log(p))).sum())


@pytest.mark.parametrize("teacher,student,top_k", [("qwen", "llama3", 16), ("mistral-v1", "llama3", 16),
                                                   ("mistral-v1", "llama3", None)])
def test_strict_kd_equals_hand_written_reverse_kl(teacher, student, top_k):
    amap, b = get_map(teacher, student), batch(teacher, student)
    a, ids = b["alignment"], b["student_input_ids"]
    t, s = vocab(teacher), vocab(student)
    tl, sl = logits(b, "teacher", amap.n_teacher, 10), logits(b, "student", amap.n_student, 11)
    per = L.strict_kd_loss(sl, tl, ids, a, amap, top_k=top_k, reduction="none")
    pos = L.strict_positions(a, amap)
    pos[:, 0] = False
    pos &= b["student_attention_mask"].bool()
    assert pos.sum() >= 10
    # strictly aligned: the student token and its teacher token spell the same bytes
    for bb, j in torch.nonzero(pos).tolist():
        k = int(a.s_teacher_token[bb, j])
        assert s.token_bytes(int(ids[bb, j])) == t.token_bytes(int(a.teacher_ids[bb, k]))
    assert torch.all(per[~pos] == 0)
    for bb, j in torch.nonzero(pos).tolist()[::3]:
        ref = _shared_reference(tl[bb, int(a.s_teacher_row[bb, j])].numpy(), sl[bb, j - 1].numpy(), teacher,
                               student, top_k)
        assert per[bb, j].item() == pytest.approx(ref, rel=1e-3, abs=1e-6)
    mod = L.StrictAlignmentKDLoss(amap, top_k=top_k)
    assert mod(sl, tl, ids, a).item() == pytest.approx(per.sum().item() / int(pos.sum()), rel=1e-5)


LOSS_FNS = {
    "bpm": lambda sl, tl, b, amap, **kw: L.bpm_loss(sl, tl, b["student_input_ids"], b["alignment"], amap,
                                                    student_mask=b["student_loss_mask"], **kw),
    "escd": lambda sl, tl, b, amap, **kw: L.escd_loss(sl, tl, b["student_input_ids"], b["alignment"], amap,
                                                      student_mask=b["student_loss_mask"], **kw),
    "strict_kd": lambda sl, tl, b, amap, **kw: L.strict_kd_loss(sl, tl, b["student_input_ids"], b["alignment"], amap,
                                                                student_mask=b["student_loss_mask"], **kw),
}


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_finite(name, dtype):
    amap, b = get_map("llama3", "mistral-v1"), batch("llama3", "mistral-v1")
    tl = logits(b, "teacher", amap.n_teacher, 12, dtype=dtype, scale=8.0)
    sl = logits(b, "student", amap.n_student, 13, dtype=dtype, scale=8.0).requires_grad_(True)
    loss = LOSS_FNS[name](sl, tl, b, amap, ce_weight=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sl.grad.float()).all() and sl.grad.abs().sum() > 0
    for red in ("sum", "none", "global_mean"):
        assert torch.isfinite(LOSS_FNS[name](sl, tl, b, amap, reduction=red)).all()
    # nothing to score: a zero that is still connected to the graph
    sl.grad = None
    z = LOSS_FNS[name](sl, tl, {**b, "student_loss_mask": torch.zeros_like(b["student_loss_mask"])}, amap)
    z.backward()
    assert z.item() == 0.0 and sl.grad is not None


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_gradcheck_small_vocabulary(name):
    """float64 gradcheck through the compiled kernels' float64 path, on a few student logits."""
    amap = get_map_small()
    b = DistillationCollator(amap)(["He went to the country to teach mathematics.", "Botchan, a reckless man."])
    tl = logits(b, "teacher", amap.n_teacher, 14, dtype=torch.float64, scale=2.0)
    base = logits(b, "student", amap.n_student, 15, dtype=torch.float64, scale=2.0)
    B, Ls, V = base.shape
    # the entries that matter: the largest gradients of the loss (and, for ESCD, of its child term)
    probe = base.clone().requires_grad_(True)
    LOSS_FNS[name](probe, tl, b, amap, mask_whitespace=False, reduction="sum").backward()
    picks = [probe.grad.abs().reshape(-1).topk(16).indices]
    if name == "escd":
        probe.grad = None
        child = L.escd_child_term(probe, tl, b["student_input_ids"], b["alignment"], amap, mask_whitespace=False)
        assert child.rows.any()
        child.values.sum().backward()
        picks.append(probe.grad.abs().reshape(-1).topk(8).indices)
    flat = torch.unique(torch.cat(picks))
    x0 = base.reshape(-1)[flat].clone().requires_grad_(True)

    def f(x):
        full = base.reshape(-1).index_put((flat,), x).reshape(B, Ls, V)
        return LOSS_FNS[name](full, tl, b, amap, mask_whitespace=False, reduction="sum")

    assert torch.autograd.gradcheck(f, (x0,), eps=1e-6, atol=1e-5, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def get_map_small():
    from ctalign import assets, build_map, load_vocab
    return build_map(load_vocab(assets.path("botchan-bpe")), load_vocab(assets.path("botchan-unigram")))


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_topk_teacher_rows_with_every_id_equal_dense(name):
    """TopK rows use the kept mass as given: keeping every id reproduces the dense loss."""
    from ctalign import ops
    amap = get_map_small()
    b = DistillationCollator(amap)(TEXTS)
    tl = logits(b, "teacher", amap.n_teacher, 19)
    sl = logits(b, "student", amap.n_student, 20)
    for T in (1.0, 2.0):
        dense = LOSS_FNS[name](sl, tl, b, amap, temperature=T)
        sparse = LOSS_FNS[name](sl, ops.topk_logprobs(tl, amap.n_teacher), b, amap, temperature=T)
        assert sparse.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-6)
        assert torch.isfinite(LOSS_FNS[name](sl, ops.topk_logprobs(tl, 8), b, amap, temperature=T))


def test_errors_are_clear():
    amap, b = get_map("llama3", "mistral-v1"), batch("llama3", "mistral-v1")
    a, ids = b["alignment"], b["student_input_ids"]
    tl, sl = logits(b, "teacher", amap.n_teacher, 17), logits(b, "student", amap.n_student, 18)
    with pytest.raises(ValueError, match="residual"):
        L.bpm_loss(sl, tl, ids, a, amap, residual="keep")
    with pytest.raises(ValueError, match="reduction"):
        L.escd_loss(sl, tl, ids, a, amap, reduction="avg")
    with pytest.raises(ValueError, match="fewer than"):
        L.bpm_loss(sl[..., :100], tl, ids, a, amap)
    with pytest.raises(ValueError, match="top_k"):
        L.strict_kd_loss(sl, tl, ids, a, amap, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        L.strict_kd_loss(sl, tl, ids, a, amap, temperature=0.0)
    with pytest.raises(TypeError, match="AlignmentMap"):
        from ctalign.prefix_groups import prefix_groups
        prefix_groups(object())
    # residual="drop": both sides renormalised without the residual column
    d = L.bpm_loss(sl, tl, ids, a, amap, residual="drop")
    assert torch.isfinite(d)


def test_prefix_groups_cached_and_summarised():
    from ctalign.prefix_groups import prefix_groups
    amap = get_map("qwen", "llama3")
    pg = prefix_groups(amap)
    assert prefix_groups(amap) is pg
    assert np.array_equal(pg.group.astype(np.int64), brute_groups("qwen", "llama3"))
    summ = pg.summary()
    assert summ["teacher_tokens"] == amap.n_teacher and summ["student_columns"] > 0
