"""Distillation losses (ctalign.losses) and the collator (ctalign.data) on real tokenizer pairs:
identical (gpt2 / gpt2), subset (gpt2 / its shrink-vocab student, llama3 / its shrunk student),
general (mistral-v1 -> botchan-bpe, llama3 -> mistral-v1). Every value is compared with a
brute-force definition written here."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import get_test_vocab  # noqa: E402

from ctalign import losses as L  # noqa: E402
from ctalign.data import DistillationCollator  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    {"prompt": "Question: what is 12 + 30?\nAnswer:", "response": " It is 42, of course."},
    "Hello,  world!\n\tNumbers 12345, café, naïve, 日本語 and emoji 🙂.",
    ("User: say hi", " Hi there! How are you doing today?"),
]


@functools.lru_cache(maxsize=None)
def get_map(teacher: str, student: str):
    from ctalign.alignment_map import build_map
    return build_map(vocab(teacher), vocab(student))


@functools.lru_cache(maxsize=None)
def vocab(name: str):
    if name.endswith("-shrunk"):
        import tempfile
        from ctalign import load_vocab
        from ctalign.shrink import shrink_vocab
        base = name[: -len("-shrunk")]
        d = tempfile.mkdtemp(prefix=f"ctalign-{base}-")
        shrink_vocab(get_test_vocab(base), 3000 if base == "gpt2" else 2500, d)
        return load_vocab(d, name=name)
    return get_test_vocab(name)


@functools.lru_cache(maxsize=None)
def batch(teacher: str, student: str, K: int = 0, texts_key: int = 0):
    amap = get_map(teacher, student)
    texts = TEXTS if texts_key == 0 else TEXTS[:2]
    return DistillationCollator(amap, byte_queries=K)(texts)


def logits_for(b, side: str, width: int, seed: int, dtype=torch.float32, scale: float = 3.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    B, Lx = b[f"{side}_input_ids"].shape
    x = (torch.randn(B, Lx, width, generator=g) * scale).to(dtype)
    return x.requires_grad_(grad)


def dense_kl_reference(t_logits, s_logits, ids_mask, V, T=1.0):
    """Standard token-level KL(teacher || student) averaged over target tokens (row j-1 -> token j)."""
    tot, n = 0.0, 0
    for b in range(t_logits.shape[0]):
        for j in range(1, t_logits.shape[1]):
            if ids_mask[b, j]:
                p = torch.log_softmax(t_logits[b, j - 1, :V].double() / T, -1)
                q = torch.log_softmax(s_logits[b, j - 1, :V].double() / T, -1)
                tot += float((p.exp() * (p - q)).sum())
                n += 1
    return tot / max(n, 1)


# ---------------------------------------------------------------------------------------------
# collator
# ---------------------------------------------------------------------------------------------
def test_collator_masks_cover_the_same_bytes():
    b = batch("llama3", "mistral-v1")
    a = b["alignment"]
    for r, ex in enumerate(TEXTS):
        start = b["response_start"][r]
        for side in ("teacher", "student"):
            n = int(b[f"{side}_attention_mask"][r].sum())
            s = (a.t_start if side == "teacher" else a.s_start)[r, :n]
            e = (a.t_end if side == "teacher" else a.s_end)[r, :n]
            role = (a.t_role if side == "teacher" else a.s_role)[r, :n]
            loss = b[f"{side}_loss_mask"][r, :n]
            byte_tokens = role == 0
            # a byte token is a target exactly when its bytes lie in the response
            assert ((s >= start)[byte_tokens & (e > s)] == loss[byte_tokens & (e > s)]).all()
            assert not b[f"{side}_loss_mask"][r, n:].any()
            assert b[f"{side}_input_ids"].shape[1] >= n


def test_collator_truncates_at_a_common_boundary():
    amap = get_map("llama3", "mistral-v1")
    text = "A fairly long sentence, with several words, to be cut somewhere in the middle of it."
    full = DistillationCollator(amap)([text])
    short = DistillationCollator(amap, max_length=(9, 8))([text])
    nt = int(short["teacher_attention_mask"].sum())
    ns = int(short["student_attention_mask"].sum())
    assert nt <= 9 and ns <= 8 and nt >= 3 and ns >= 3
    cut = short["texts"][0]
    assert text.startswith(cut) and len(cut) < len(text)
    # the kept tokens are the full encoding's first tokens (no eos: the text did not end there)
    assert short["teacher_input_ids"][0, :nt].tolist() == full["teacher_input_ids"][0, :nt].tolist()
    assert short["student_input_ids"][0, :ns].tolist() == full["student_input_ids"][0, :ns].tolist()


def test_collator_cuts_at_the_last_common_boundary_that_fits():
    """Brute force: every cut the collator could make is a common prefix of both tokenizations;
    the chosen one is the longest whose token counts fit both limits."""
    amap = get_map("llama3", "mistral-v1")
    text = "Truncation: 12345 apples, naïve café owners, and 東京 — all at once, twice over."
    collate = DistillationCollator(amap, add_bos=False, add_eos=False)
    full = collate([text])
    t_full = full["teacher_input_ids"][0].tolist()
    s_full = full["student_input_ids"][0].tolist()
    T, S = amap.teacher, amap.student

    def prefix_cuts(ids, vocab):  # byte length spelled by the first n tokens, for every n
        out, n = {0: 0}, 0
        for k, i in enumerate(ids, 1):
            n += len(vocab.token_bytes(i) or b"")
            out[n] = k
        return out

    t_cuts, s_cuts = prefix_cuts(t_full, T), prefix_cuts(s_full, S)
    lead = S.prefix_space and 1 or 0  # the student's dummy space before the first word
    for mt, ms in [(3, 3), (5, 9), (9, 5), (12, 12), (20, 7)]:
        fitting = [pos for pos, nt in t_cuts.items()
                   if nt <= mt and pos + lead in s_cuts and s_cuts[pos + lead] <= ms]
        got = DistillationCollator(amap, add_bos=False, add_eos=False, max_length=(mt, ms))([text])
        assert got["texts"][0].encode("utf-8") == text.encode("utf-8")[:max(fitting)], (mt, ms)


def test_collator_rejects_bad_examples():
    amap = get_map("gpt2", "gpt2")
    c = DistillationCollator(amap)
    with pytest.raises(TypeError, match="example 1"):
        c(["ok", 3])
    with pytest.raises(ValueError, match="empty batch"):
        c([])


# ---------------------------------------------------------------------------------------------
# identical tokenizers
# ---------------------------------------------------------------------------------------------
# mistral-v1 has ids with the same bytes (`▁` and `<0x20>`): identical means id for id, not by bytes
@pytest.mark.parametrize("name", ["gpt2", "mistral-v1"])
def test_likelihood_loss_equals_token_kl_for_identical_tokenizers(name):
    amap = get_map(name, name)
    assert amap.regime == "identical"
    b = batch(name, name)
    V = len(vocab(name))
    t = logits_for(b, "teacher", V + 3, 1)
    s = logits_for(b, "student", V + 5, 2, grad=True)
    mask = b["student_loss_mask"]
    ref = dense_kl_reference(t, s.detach(), mask & (torch.arange(mask.shape[1]) > 0), V)
    for top_k in (None, V):
        got = L.likelihood_distillation_loss(s, t, b["student_input_ids"], b["alignment"], amap,
                                             student_mask=mask, kl_weight=1.0, ce_weight=0.0, top_k=top_k)
        assert abs(got.item() - ref) < 1e-5, (top_k, got.item(), ref)
    # temperature: the same with both sides' logits divided by T
    got = L.LikelihoodDistillationLoss(amap, kl_weight=1.0, ce_weight=0.0, top_k=None, temperature=2.0)(
        s, t, b["student_input_ids"], b["alignment"], mask)
    assert abs(got.item() - dense_kl_reference(t, s.detach(), mask, V, T=2.0)) < 1e-5


def test_uld_byte_alignment_equals_positional_for_identical_tokenizers():
    b = batch("gpt2", "gpt2")
    V = len(vocab("gpt2"))
    t = logits_for(b, "teacher", V, 3)
    s = logits_for(b, "student", V, 4, grad=True)
    kw = dict(student_mask=b["student_loss_mask"], teacher_mask=b["teacher_loss_mask"], alignment=b["alignment"])
    for top_k in (None, 16):
        pos = L.uld_loss(s, t, b["student_input_ids"], align="positional", top_k=top_k, **kw)
        byt = L.uld_loss(s, t, b["student_input_ids"], align="byte", top_k=top_k, **kw)
        assert abs(pos.item() - byt.item()) < 1e-5


# ---------------------------------------------------------------------------------------------
# subset regime: the targets carry the teacher's likelihood exactly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", ["exact", "boundary"])
@pytest.mark.parametrize("teacher", ["gpt2", "llama3"])
def test_subset_targets_carry_the_teacher_likelihood(teacher, targets):
    """Telescoping (docs/design.md, identity 5): the targets' path log-probabilities at the student's
    tokens plus end_logprob give the teacher's log-likelihood; with targets="boundary" the path
    values are the targets themselves."""
    student = teacher + "-shrunk"
    amap = get_map(teacher, student)
    assert amap.regime == "subset"
    b = batch(teacher, student)
    a = b["alignment"]
    tv = vocab(teacher)
    t = logits_for(b, "teacher", len(tv) + 8, 5)
    tg = L.likelihood_targets(t, amap, a, with_end=True, targets=targets)
    if targets == "boundary":
        sid = b["student_input_ids"]
        assert torch.equal(tg.path_logprob[tg.valid], tg.logprobs.gather(-1, sid[..., None])[..., 0][tg.valid])
    t_ids, s_ids = b["teacher_input_ids"], b["student_input_ids"]
    for r in range(t_ids.shape[0]):
        nt = int(b["teacher_attention_mask"][r].sum())
        ns = int(b["student_attention_mask"][r].sum())
        lp = torch.log_softmax(t[r, :, : len(tv)].double(), -1)
        teacher_ll = sum(float(lp[k - 1, t_ids[r, k]]) for k in range(1, nt))
        predicted = (a.s_teacher_row[r, :ns] >= 0)
        # every student token predicted by a teacher row has a target: consumed pieces always exist
        assert tg.valid[r, :ns][predicted].all()
        student_ll = 0.0
        for j in range(ns):
            if predicted[j]:
                student_ll += float(tg.path_logprob[r, j]) + float(tg.end_logprob[r, j])
        assert abs(teacher_ll - student_ll) < 1e-4, (r, teacher_ll, student_ll)
        # the teacher tokens without a predicting row are exactly those of the unpredicted student tokens
        assert int(predicted.sum()) > 0


def test_targets_are_distributions_in_the_general_regime():
    amap = get_map("mistral-v1", "botchan-bpe")
    assert amap.regime == "general"
    b = batch("mistral-v1", "botchan-bpe")
    t = logits_for(b, "teacher", len(vocab("mistral-v1")), 6)
    tg = L.likelihood_targets(t, amap, b["alignment"])
    rows = tg.logprobs[tg.valid]
    assert rows.shape[0] > 0
    assert torch.allclose(torch.logsumexp(rows.double(), -1), torch.zeros(rows.shape[0], dtype=torch.float64),
                          atol=1e-5)
    assert not torch.isnan(tg.logprobs).any()


# ---------------------------------------------------------------------------------------------
# brute-force values
# ---------------------------------------------------------------------------------------------
def uld_case(teacher_seed: int, student_seed: int):
    """mistral-v1 -> botchan-bpe batch, random logits of both sides, and the loss masks with the first
    position off (it has no previous logits row): (b, Vt, Vs, t, s, sm, tm)."""
    amap = get_map("mistral-v1", "botchan-bpe")
    b = batch("mistral-v1", "botchan-bpe")
    Vt, Vs = amap.n_teacher, amap.n_student
    t = logits_for(b, "teacher", Vt, teacher_seed)
    s = logits_for(b, "student", Vs + 2, student_seed, grad=True)
    sm, tm = b["student_loss_mask"].clone(), b["teacher_loss_mask"].clone()
    sm[:, 0] = False
    tm[:, 0] = False
    return b, Vt, Vs, t, s, sm, tm


def paired_targets(sm, tm):
    """(row, student position, teacher position): the i-th target of each side, positionally."""
    for r in range(sm.shape[0]):
        for j, k in zip(torch.nonzero(sm[r]).flatten().tolist(), torch.nonzero(tm[r]).flatten().tolist()):
            yield r, j, k


def test_uld_matches_bruteforce_and_topk_covering_is_exact():
    b, Vt, Vs, t, s, sm, tm = uld_case(7, 8)
    w1, n_pairs = 0.0, 0
    for r, j, k in paired_targets(sm, tm):
        ps = np.sort(torch.softmax(s[r, j - 1, :Vs].double(), -1).detach().numpy())[::-1]
        pt = np.sort(torch.softmax(t[r, k - 1, :Vt].double(), -1).numpy())[::-1]
        ps = np.pad(ps, (0, Vt - Vs))
        w1 += np.abs(ps - pt).sum()
        n_pairs += 1
    ids = b["student_input_ids"]
    ce = -sum(float(torch.log_softmax(s.detach()[r, j - 1, :Vs].double(), -1)[ids[r, j]])
              for r, j in torch.nonzero(sm).tolist()) / int(sm.sum())
    kw = dict(student_mask=b["student_loss_mask"], teacher_mask=b["teacher_loss_mask"], student_vocab_size=Vs)
    got = L.uld_loss(s, t, b["student_input_ids"], **kw)
    assert abs(got.item() - (ce + w1 / n_pairs)) < 1e-4
    got_w = L.ULDLoss(uld_weight=0.5, ce_weight=0.0, student_vocab_size=Vs, reduction="sum")(
        s, t, b["student_input_ids"], None, b["student_loss_mask"], b["teacher_loss_mask"])
    assert abs(got_w.item() - 0.5 * w1) < 1e-3
    covering = L.uld_loss(s, t, b["student_input_ids"], top_k=Vt, **kw)
    assert abs(covering.item() - got.item()) < 1e-5
    # top-k is a lower bound of the full distance
    assert L.uld_loss(s, t, b["student_input_ids"], top_k=8, **kw).item() <= got.item() + 1e-6


def test_uld_top_k_equals_its_definition_with_gradients():
    """top_k: the k largest probabilities of each side sorted, L1, plus |tail_s - tail_t| (by definition,
    torch.topk over softmaxes in float64), value and gradient, a real pair of different families."""
    b, Vt, Vs, t, s, sm, tm = uld_case(11, 12)
    k, T = 24, 1.3
    total, n_pairs = 0.0, 0
    s64 = s.detach().double().requires_grad_()
    for r, j, kk in paired_targets(sm, tm):
        ps = torch.softmax(s64[r, j - 1, :Vs] / T, -1).topk(k).values
        pt = torch.softmax(t[r, kk - 1, :Vt].double() / T, -1).topk(k).values
        total = total + (ps - pt).abs().sum() + ((1 - ps.sum()) - (1 - pt.sum())).abs()
        n_pairs += 1
    want = total / n_pairs
    want.backward()
    got = L.uld_loss(s, t, b["student_input_ids"], top_k=k, temperature=T, ce_weight=0.0, student_mask=sm,
                     teacher_mask=tm, student_vocab_size=Vs)
    got.backward()
    assert abs(got.item() - want.item()) < 1e-5
    assert torch.allclose(s.grad.double(), s64.grad, atol=1e-6), (s.grad.double() - s64.grad).abs().max()
    # a sparse teacher (TopK rows of 40 entries, used as given): its top k of the kept entries
    from ctalign.ops import TopK
    vals, idx = torch.topk(torch.log_softmax(t[..., :Vt].double(), -1), 40, dim=-1)
    total = 0.0
    s64 = s.detach().double().requires_grad_()
    for r, j, kk in paired_targets(sm, tm):
        ps = torch.softmax(s64[r, j - 1, :Vs] / T, -1).topk(k).values
        kept = torch.log_softmax(vals[r, kk - 1] / T, -1) + torch.logsumexp(vals[r, kk - 1], -1)
        pt = kept.exp().topk(k).values
        total = total + (ps - pt).abs().sum() + ((1 - ps.sum()) - (1 - pt.sum())).abs()
    s.grad = None
    got = L.uld_loss(s, TopK(idx, vals.float()), b["student_input_ids"], top_k=k, temperature=T, ce_weight=0.0,
                     student_mask=sm, teacher_mask=tm, student_vocab_size=Vs)
    assert abs(got.item() - total.item() / n_pairs) < 1e-5
    got.backward()
    (total / n_pairs).backward()
    assert torch.allclose(s.grad.double(), s64.grad, atol=1e-6), (s.grad.double() - s64.grad).abs().max()


def test_uld_top_k_compiled_path_equals_the_torch_path():
    """On CPU the top-k ULD runs ops.topk_logprobs in place; the pure-torch path (forced) gives the same
    value and gradient, for dense and sparse teachers; bad rows are named by side and position."""
    from ctalign import ops
    from ctalign.errors import NonFiniteLogitsError
    from ctalign.ops import TopK
    amap = get_map("gpt2", "mistral-v1")
    b = batch("gpt2", "mistral-v1")
    Vt, Vs = amap.n_teacher, amap.n_student
    t = logits_for(b, "teacher", Vt + 3, 13)
    vals, idx = torch.topk(torch.log_softmax(t[..., :Vt], -1), 50, dim=-1)
    kw = dict(student_mask=b["student_loss_mask"], teacher_mask=b["teacher_loss_mask"], student_vocab_size=Vs,
              teacher_vocab_size=Vt, temperature=0.9, top_k=torch.tensor(32))
    for teacher in (t, TopK(idx, vals)):
        results = []
        for backend in (None, "reference"):
            s = logits_for(b, "student", Vs + 5, 14, grad=True)
            with ops.force_backend(backend):
                loss = L.uld_loss(s, teacher, b["student_input_ids"], **kw)
                if backend is None:
                    assert ops.last_backend() == "cpu"  # the compiled top-k served it
            loss.backward()
            results.append((loss.item(), s.grad))
        assert abs(results[0][0] - results[1][0]) < 1e-5
        assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    s = logits_for(b, "student", Vs, 14)
    bj = torch.nonzero(b["student_loss_mask"])[3]
    s[bj[0], bj[1] - 1, 7] = float("nan")
    for backend in (None, "reference"):  # the compiled and the torch path refuse it alike
        with ops.force_backend(backend), pytest.raises(
                NonFiniteLogitsError, match=f"uld_loss: student logits at batch {int(bj[0])}, position "
                                            f"{int(bj[1]) - 1} hold NaN") as err:
            L.uld_loss(s, t, b["student_input_ids"], **kw)
        assert err.value.row == int(bj[0]) * s.shape[1] + int(bj[1]) - 1
    t_bad = t.clone()
    tj = torch.nonzero(b["teacher_loss_mask"])[2]
    t_bad[tj[0], tj[1] - 1, :Vt] = float("-inf")
    for backend in (None, "reference"):
        with ops.force_backend(backend), pytest.raises(NonFiniteLogitsError, match="teacher logits .* only -inf"):
            L.uld_loss(logits_for(b, "student", Vs, 14), t_bad, b["student_input_ids"], **kw)


def _bld_bruteforce(s, head, t, b, tv, sv, K, lambda_b, lambda_kl):
    """BLD by definition with reduction='sum' and targets="boundary" (the byte targets conditioned on
    the teacher's boundaries): loops over tokens, bytes and the teacher vocabulary. The exact byte
    targets' brute force is in test_exact_targets.py."""
    a = b["alignment"]
    ids = b["student_input_ids"]
    tb = [tv.token_bytes(i) or b"" for i in range(len(tv))]
    ce = byte_ce = kl = 0.0
    for r in range(ids.shape[0]):
        ns = int(b["student_attention_mask"][r].sum())
        t_ids = b["teacher_input_ids"][r].tolist()
        t_start, t_end, t_lead = a.t_start[r].tolist(), a.t_end[r].tolist(), a.t_lead[r].tolist()
        nt = int(b["teacher_attention_mask"][r].sum())
        for j in range(1, ns):
            if not b["student_loss_mask"][r, j]:
                continue
            sid = int(ids[r, j])
            ce -= float(torch.log_softmax(s[r, j - 1, : len(sv)].double(), -1)[sid])
            hb = torch.log_softmax(head[r, j - 1].double(), -1)  # [K, 257]
            own = sv.token_bytes(sid) or b""
            for i in range(K):
                if i < len(own):
                    byte_ce -= float(hb[i, own[i]])
                elif i == len(own):
                    byte_ce -= float(hb[i, 256])
            # teacher byte targets at the text offsets of the token's bytes
            lead = int(a.s_lead[r, j])
            for i in range(lead, min(K, len(own))):
                pos = int(a.s_start[r, j]) - lead + i
                k = next((k for k in range(nt) if t_end[k] > t_start[k] and t_end[k] > pos), None)
                if k is None or k == 0:
                    continue
                depth = pos - t_start[k] + t_lead[k] if t_start[k] <= pos else 0
                prefix = tb[t_ids[k]][:depth]
                p = torch.softmax(t[r, k - 1, : len(tv)].double(), -1).numpy()
                mass = np.zeros(256)
                for x, bx in enumerate(tb):
                    if len(bx) > depth and bx.startswith(prefix):
                        mass[bx[depth]] += p[x]
                if mass.sum() <= 0:
                    continue
                q = mass / mass.sum()
                nz = q > 0
                kl += float((q[nz] * (np.log(q[nz]) - hb[i, :256].numpy()[nz])).sum())
    return ce + lambda_b * byte_ce + lambda_kl * kl


def test_bld_matches_bruteforce():
    teacher, student = "botchan-bpe", "botchan-unigram"
    K = 4
    amap = get_map(teacher, student)
    b = DistillationCollator(amap, byte_queries=K)(["the boy and the cat.", ("Q: who?", " Botchan went home")])
    tv, sv = vocab(teacher), vocab(student)
    t = logits_for(b, "teacher", len(tv), 9)
    s = logits_for(b, "student", len(sv), 10, grad=True)
    torch.manual_seed(0)
    head = torch.randn(*s.shape[:2], K, 257, requires_grad=True)
    got = L.byte_level_distillation_loss(s, head, t, b["student_input_ids"], b["alignment"], student_vocab=sv,
                                         teacher_vocab=tv, student_mask=b["student_loss_mask"], lambda_b=0.7,
                                         lambda_kl=0.3, reduction="sum", targets="boundary")
    ref = _bld_bruteforce(s.detach(), head.detach(), t, b, tv, sv, K, 0.7, 0.3)
    assert abs(got.item() - ref) < 1e-3 * max(1.0, abs(ref)), (got.item(), ref)
    got.backward()
    assert torch.isfinite(head.grad).all() and head.grad.abs().sum() > 0


def test_alm_matches_bruteforce_chunks():
    teacher, student = "mistral-v1", "botchan-bpe"
    amap = get_map(teacher, student)
    b = batch(teacher, student)
    a = b["alignment"]
    Vt, Vs = amap.n_teacher, amap.n_student
    t = logits_for(b, "teacher", Vt, 11, scale=1.0)
    s = logits_for(b, "student", Vs, 12, scale=1.0, grad=True)
    tau = 10.0
    got = L.alm_loss(s, t, b["student_input_ids"], b["teacher_input_ids"], a, student_mask=b["student_loss_mask"],
                     teacher_mask=b["teacher_loss_mask"], tau=tau, reduction="sum")
    ref, n = 0.0, 0
    for r in range(t.shape[0]):
        nt = int(b["teacher_attention_mask"][r].sum())
        ns = int(b["student_attention_mask"][r].sum())
        for c in range(int(a.n_chunks[r])):
            tk = [k for k in range(nt) if a.t_chunk[r, k] == c]
            sj = [j for j in range(ns) if a.s_chunk[r, j] == c]
            if not tk or not sj:
                continue
            if any(k == 0 or not b["teacher_loss_mask"][r, k] for k in tk):
                continue
            if any(j == 0 or not b["student_loss_mask"][r, j] for j in sj):
                continue
            lt = sum(float(torch.log_softmax(t[r, k - 1].double(), -1)[b["teacher_input_ids"][r, k]]) for k in tk)
            ls = sum(float(torch.log_softmax(s.detach()[r, j - 1].double(), -1)[b["student_input_ids"][r, j]]) for j in sj)
            yt, ys = math.exp(lt / tau - 1e-6), math.exp(ls / tau - 1e-6)
            ref += -(yt * math.log(ys) + (1 - yt) * math.log(1 - ys))
            n += 1
    assert n > 5
    assert abs(got.item() - ref) < 1e-4 * max(1.0, ref), (got.item(), ref)
    mean = L.ApproximateLikelihoodMatchingLoss(tau=tau)(s, t, b["student_input_ids"], b["teacher_input_ids"], a,
                                                       b["student_loss_mask"], b["teacher_loss_mask"])
    assert abs(mean.item() - ref / n) < 1e-5 * max(1.0, ref)


def test_alm_is_stationary_when_the_student_equals_the_teacher():
    amap = get_map("gpt2", "gpt2")
    b = batch("gpt2", "gpt2")
    V = amap.n_teacher
    t = logits_for(b, "teacher", V, 13)
    s = t.clone().requires_grad_(True)
    for debias in (False, True):
        loss = L.alm_loss(s, t, b["student_input_ids"], b["teacher_input_ids"], b["alignment"], debias=debias,
                          student_vocab=vocab("gpt2"), teacher_vocab=vocab("gpt2"))
        g, = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all() and g.abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# gradients, dtypes, masks, padding
# ---------------------------------------------------------------------------------------------
def _all_losses(amap, b, s, t, head=None, reduction="mean", debias=True):
    ids, a = b["student_input_ids"], b["alignment"]
    sm, tm = b["student_loss_mask"], b["teacher_loss_mask"]
    sv, tv = amap.student, amap.teacher
    out = {
        "uld": L.uld_loss(s, t, ids, alignment=a, student_mask=sm, teacher_mask=tm, align="byte", top_k=32,
                          student_vocab_size=len(sv), teacher_vocab_size=len(tv), reduction=reduction),
        "likelihood": L.likelihood_distillation_loss(s, t, ids, a, amap, student_mask=sm, reduction=reduction),
        "alm": L.alm_loss(s, t, ids, b["teacher_input_ids"], a, student_mask=sm, teacher_mask=tm, debias=debias,
                          student_vocab=sv, teacher_vocab=tv, reduction=reduction),
    }
    if head is not None:
        out["bld"] = L.byte_level_distillation_loss(s, head, t, ids, a, student_vocab=sv, teacher_vocab=tv,
                                                    student_mask=sm, reduction=reduction)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pair", [("mistral-v1", "botchan-bpe"), ("gpt2", "gpt2-shrunk")])
def test_gradients_are_finite(pair, dtype):
    amap = get_map(*pair)
    b = batch(*pair, K=10)
    t = logits_for(b, "teacher", amap.n_teacher + 4, 14, dtype=dtype)
    s = logits_for(b, "student", amap.n_student, 15, dtype=dtype, grad=True)
    head_mod = L.ByteHead(16, 10).to(dtype)
    hidden = torch.randn(*s.shape[:2], 16).to(dtype)
    head = head_mod(hidden)
    for name, loss in _all_losses(amap, b, s, t, head).items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        g = torch.autograd.grad(loss, s, retain_graph=True)[0]
        assert g.dtype == dtype and torch.isfinite(g.float()).all() and g.float().abs().sum() > 0, name
    L.byte_level_distillation_loss(s, head, t, b["student_input_ids"], b["alignment"], student_vocab=amap.student,
                                   teacher_vocab=amap.teacher).backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in head_mod.parameters())


def test_reductions_and_masks():
    pair = ("mistral-v1", "botchan-bpe")
    amap = get_map(*pair)
    b = batch(*pair, K=10)
    t = logits_for(b, "teacher", amap.n_teacher, 16)
    s = logits_for(b, "student", amap.n_student, 17, grad=True)
    head = torch.randn(*s.shape[:2], 10, 257)
    none = _all_losses(amap, b, s, t, head, "none")
    total = _all_losses(amap, b, s, t, head, "sum")
    for name in none:
        assert abs(none[name].sum().item() - total[name].item()) < 1e-3 * max(1, abs(total[name].item())), name
    # logits at positions that predict no target do not matter (zero gradient there); ALM's
    # debiasing reads the row after each chunk on purpose, so it is checked without it
    for name, loss in _all_losses(amap, b, s, t, head, debias=False).items():
        g = torch.autograd.grad(loss, s)[0]
        sm = b["student_loss_mask"].clone()
        predicts_target = torch.zeros_like(sm)
        predicts_target[:, :-1] = sm[:, 1:]
        assert g[~predicts_target].abs().max() == 0, name


def test_padding_changes_nothing():
    pair = ("mistral-v1", "botchan-bpe")
    amap = get_map(*pair)
    b = batch(*pair, K=10)
    t = logits_for(b, "teacher", amap.n_teacher, 18)
    s = logits_for(b, "student", amap.n_student, 19, grad=True)
    head = torch.randn(*s.shape[:2], 10, 257)
    ref = _all_losses(amap, b, s, t, head, "sum")
    # the same batch padded with 5 more positions on each side (junk logits, junk ids, mask 0)
    pb = dict(b)
    for side, x in (("teacher", t), ("student", s)):
        pb[f"{side}_input_ids"] = torch.cat([b[f"{side}_input_ids"], torch.full((x.shape[0], 5), 7)], 1)
        pb[f"{side}_loss_mask"] = torch.cat([b[f"{side}_loss_mask"], torch.ones(x.shape[0], 5, dtype=torch.bool)], 1)
    pt = torch.cat([t, torch.randn(t.shape[0], 5, t.shape[2]) * 50], 1)
    ps = torch.cat([s.detach(), torch.randn(s.shape[0], 5, s.shape[2]) * 50], 1).requires_grad_(True)
    phead = torch.cat([head, torch.randn(head.shape[0], 5, 10, 257)], 1)
    got = _all_losses(amap, pb, ps, pt, phead, "sum")
    for name in ref:
        assert abs(got[name].item() - ref[name].item()) < 1e-4 * max(1, abs(ref[name].item())), name


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_gives_errors_or_zero_losses():
    pair = ("mistral-v1", "botchan-bpe")
    amap = get_map(*pair)
    b = batch(*pair, K=10)
    t = logits_for(b, "teacher", amap.n_teacher, 20)
    s = logits_for(b, "student", amap.n_student, 21, grad=True)
    ids, a = b["student_input_ids"], b["alignment"]
    # vocabulary width mismatch
    with pytest.raises(ValueError, match="columns"):
        L.likelihood_distillation_loss(s[..., :100], t, ids, a, amap)
    with pytest.raises(ValueError, match="columns"):
        L.likelihood_distillation_loss(s, t[..., :1000], ids, a, amap)
    with pytest.raises(ValueError, match="columns"):
        L.uld_loss(s, t, ids, student_vocab_size=amap.n_student + 10)
    with pytest.raises(ValueError, match="reduction"):
        L.uld_loss(s, t, ids, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        L.ULDLoss(temperature=0)
    with pytest.raises(ValueError, match="batch"):
        L.alm_loss(s, t[:1], ids, b["teacher_input_ids"][:1], a)
    wrong = ids.clone()
    wrong[0, 2] = (wrong[0, 2] + 1) % amap.n_student
    for fn in (lambda: L.likelihood_distillation_loss(s, t, wrong, a, amap),
               lambda: L.uld_loss(s, t, wrong, alignment=a, align="byte"),
               lambda: L.alm_loss(s, t, wrong, b["teacher_input_ids"], a)):
        with pytest.raises(ValueError, match="not the ids the alignment was computed for"):
            fn()
    with pytest.raises(ValueError):  # NaN teacher logits are refused by the ops
        L.likelihood_distillation_loss(s, torch.full_like(t, float("nan")), ids, a, amap)
    out_of_range = ids.clone()
    out_of_range[b["student_loss_mask"]] = amap.n_student + 3
    for ce_weight in (1.0, 0.0):  # refused with or without the CE term
        with pytest.raises(ValueError, match=f"token id {amap.n_student + 3} is outside the vocabulary"):
            L.uld_loss(s, t, out_of_range, ce_weight=ce_weight, top_k=8,
                       student_mask=b["student_loss_mask"], teacher_mask=b["teacher_loss_mask"])
    # all-masked batch: a zero loss connected to the graph, zero gradient
    none = torch.zeros_like(b["student_loss_mask"])
    for name, loss in _all_losses(amap, {**b, "student_loss_mask": none, "teacher_loss_mask": none[:, :0].new_zeros(
            b["teacher_loss_mask"].shape)}, s, t, torch.randn(*s.shape[:2], 10, 257)).items():
        assert loss.item() == 0.0, name
        g = torch.autograd.grad(loss, s)[0]
        assert (g == 0).all(), name
    # empty sequences (no tokens, then one token): zeros, never NaN
    from ctalign.data import DistillationCollator
    e = DistillationCollator(amap, add_bos=False, add_eos=False, byte_queries=10)([""])
    for width in (0, 1):
        eb = dict(e)
        for side in ("teacher", "student"):
            eb[f"{side}_input_ids"] = e[f"{side}_input_ids"][:, :width]
            eb[f"{side}_loss_mask"] = e[f"{side}_loss_mask"][:, :width]
        es = torch.randn(1, width, amap.n_student, requires_grad=True)
        et = torch.randn(1, width, amap.n_teacher)
        for name, loss in _all_losses(amap, eb, es, et, torch.randn(1, width, 10, 257)).items():
            assert loss.item() == 0.0 and not torch.isnan(loss), (name, width)
            loss.backward()


def test_ids_that_do_not_match_the_text_are_refused():
    from ctalign.align import align
    amap = get_map("mistral-v1", "botchan-bpe")
    tv, sv = amap.teacher, amap.student
    with pytest.raises(ValueError, match="does not tokenize"):
        align([tv.encode("one text")], [sv.encode("another text")], amap=amap, texts=["one text"])


def test_bytehead_is_removable():
    """The head only reads hidden states: the student's parameters and outputs are untouched."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    head = L.ByteHead(16, num_bytes=10)
    x = torch.randint(0, 50, (2, 7))
    hidden = student[0](x)
    out = head(hidden)
    assert out.shape == (2, 7, 10, 257)
    out.sum().backward()
    assert set(student.state_dict()) == set(before)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())
    assert not any(k.startswith("head") for k in student.state_dict())


def test_token_byte_targets_match_token_bytes():
    v = vocab("mistral-v1")
    K = 5
    tab = L.token_byte_targets(v, K)
    for i in list(range(0, 400)) + list(range(len(v) - 200, len(v))):
        tb = v.token_bytes(i) or b""
        want = [tb[k] if k < len(tb) else (256 if k == len(tb) else -100) for k in range(K)]
        assert tab[i].tolist() == want, i


def test_sparse_teacher_rows_equal_dense_when_k_covers_the_vocabulary():
    """Teacher outputs cached as top-k rows (ctalign.TopK, [B, Lt, k]) give the dense losses when k = V."""
    from ctalign.ops import TopK
    pair = ("botchan-bpe", "botchan-unigram")
    amap = get_map(*pair)
    b = batch(*pair, K=10)
    V = amap.n_teacher
    t = logits_for(b, "teacher", V, 22)
    lp = torch.log_softmax(t, -1)
    vals, idx = torch.topk(lp, V, -1)
    sparse = TopK(idx, vals)
    s = logits_for(b, "student", amap.n_student, 23, grad=True)
    ids, a, sm = b["student_input_ids"], b["alignment"], b["student_loss_mask"]
    head = torch.randn(*s.shape[:2], 10, 257)
    dense_l = L.likelihood_distillation_loss(s, t, ids, a, amap, student_mask=sm)
    sparse_l = L.likelihood_distillation_loss(s, sparse, ids, a, amap, student_mask=sm)
    assert abs(dense_l.item() - sparse_l.item()) < 1e-5
    kw = dict(student_vocab=amap.student, teacher_vocab=amap.teacher, student_mask=sm)
    dense_b = L.byte_level_distillation_loss(s, head, t, ids, a, **kw)
    sparse_b = L.byte_level_distillation_loss(s, head, sparse, ids, a, **kw)
    assert abs(dense_b.item() - sparse_b.item()) < 1e-5
    ukw = dict(student_mask=sm, teacher_mask=b["teacher_loss_mask"], top_k=V)
    assert abs(L.uld_loss(s, t, ids, **ukw).item() - L.uld_loss(s, sparse, ids, **ukw).item()) < 1e-5
    with pytest.raises(TypeError, match="dense"):
        L.alm_loss(s, sparse, ids, b["teacher_input_ids"], a)
