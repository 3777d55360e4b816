"""The exact training targets (targets="exact", the default) against brute-force marginals over
covers (tests/_covers.py), float64, a deterministic hash "teacher", real tokenizer pairs of two
families in the subset regime (gpt2 / its shrink-vocab student, llama3 / its shrunk student); the
exact-position share in the general regime."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _covers import HashTeacher, Units, next_unit, restricted_covers  # noqa: E402
from test_losses import get_map, vocab  # noqa: E402

from ctalign import losses as L  # noqa: E402
from ctalign.align import align  # noqa: E402

TEXTS = ["The quick brown fox jumps over it.", "naïve café: 12345 apples, 日本語!"]
K = 4


def _ctx(vocab_):
    for role in ("bos", "eos"):
        if role in vocab_.special_ids:
            return vocab_.special_ids[role]
    raise AssertionError("no bos/eos")


def subset_case(teacher: str, texts=TEXTS, byte_queries: int = 0):
    """(amap, alignment, teacher ids rows, student ids rows, hash teacher, float64 logits): each row is
    a context special (bos, else eos) then the text's tokens, on both sides."""
    amap = get_map(teacher, teacher + "-shrunk")
    tv, sv = amap.teacher, amap.student
    t_rows = [[_ctx(tv)] + tv.encode(x) for x in texts]
    s_rows = [[_ctx(sv)] + sv.encode(x) for x in texts]
    a = align(t_rows, s_rows, amap=amap, texts=list(texts), byte_queries=byte_queries)
    teacher_fn = HashTeacher(len(tv) + 3, salt=hash(teacher) & 0xFFFF)
    return amap, a, t_rows, s_rows, teacher_fn, teacher_fn.logits(t_rows)


def allowed_prefix_lengths(k: int, at_start: bool) -> set[int]:
    """How many of the teacher's own text tokens a cover keeps, for a unit in teacher token k (index
    in the row, after the context): inside t_k, all k - 1 before it; at its start also k - 2 (t_{k-1}
    goes on)."""
    return {k - 2, k - 1} - {-1} if at_start else {k - 1}


@pytest.mark.parametrize("teacher", ["gpt2", "llama3"])
def test_exact_likelihood_targets_equal_the_restricted_bruteforce_marginal(teacher):
    amap, a, t_rows, s_rows, fn, logits = subset_case(teacher)
    assert amap.regime == "subset"
    units = Units.student(amap)
    assert all(len(ids) == 1 for ids in units.full.values())  # no two teacher tokens share a dec_S here
    tg = L.likelihood_targets(logits, amap, a)
    fast = L.likelihood_targets(logits, amap, a, targets="boundary")
    assert tg.logprobs.dtype == torch.float64
    n_pos = n_boundary = 0
    tv_at_boundaries = []
    for b, (t_ids, s_ids) in enumerate(zip(t_rows, s_rows)):
        x, canon = s_ids[1:], t_ids[1:]
        for j in range(1, len(s_ids)):
            assert bool(tg.valid[b, j]) and bool(tg.exact[b, j]), (b, j)
            k = int(a.s_teacher_token[b, j])
            at_start = bool(a.s_at_boundary[b, j])
            cov = restricted_covers(units, x, j - 1, fn, t_ids[:1], amap.n_teacher, canon,
                                    allowed_prefix_lengths(k, at_start))
            q = next_unit(units, x, j - 1, fn, t_ids[:1], amap.n_teacher, cov)
            q = q / q.sum()
            got = tg.logprobs[b, j].exp().numpy()
            assert np.abs(got - q).max() < 1e-6, (b, j, np.abs(got - q).max())
            n_pos += 1
            if at_start and k >= 2:
                n_boundary += 1
                f = fast.logprobs[b, j].exp().numpy()
                tv_at_boundaries.append(0.5 * np.abs(f - q).sum())
    assert n_pos > 20 and n_boundary > 5
    assert max(tv_at_boundaries) > 1e-3  # the boundary form is not the exact one there


@pytest.mark.parametrize("teacher", ["gpt2", "llama3"])
def test_exact_byte_targets_equal_the_restricted_bruteforce_byte_marginal(teacher):
    amap, a, t_rows, s_rows, fn, logits = subset_case(teacher, byte_queries=K)
    tv = amap.teacher
    units = Units.bytes_of(tv)
    lp, valid = L.byte_targets(logits, tv, a, K)
    fast, _ = L.byte_targets(logits, tv, a, K, targets="boundary")
    assert lp.dtype == torch.float64
    n = n_start = n_differ = 0
    for b, (t_ids, s_ids) in enumerate(zip(t_rows, s_rows)):
        x = b"".join(tv.token_bytes(t) for t in t_ids[1:])
        t_start, t_end = a.t_start[b].tolist(), a.t_end[b].tolist()
        for j in range(1, len(s_ids)):
            own = amap.student.token_bytes(s_ids[j]) or b""
            for i in range(min(K, len(own))):
                assert bool(valid[b, j, i]), (b, j, i)
                pos = int(a.s_start[b, j]) + i
                k = next(k for k in range(1, len(t_ids)) if t_start[k] <= pos < t_end[k])
                at_start = pos == t_start[k]
                cov = restricted_covers(units, x, pos, fn, t_ids[:1], len(tv), t_ids[1:],
                                        allowed_prefix_lengths(k, at_start))
                q = next_unit(units, x, pos, fn, t_ids[:1], len(tv), cov)[:256]
                q = q / q.sum()
                got = lp[b, j, i].exp().numpy()
                assert np.abs(got - q).max() < 1e-6, (b, j, i, np.abs(got - q).max())
                n += 1
                if at_start and k >= 2:
                    n_start += 1  # equal where no teacher token extends t_{k-1}'s bytes
                    n_differ += not torch.allclose(fast[b, j, i], lp[b, j, i])
    assert n > 40 and n_start > 5 and n_differ > 3


def test_losses_default_to_the_exact_targets():
    """The likelihood loss with no targets= equals it with the precomputed exact targets, and differs
    from targets="boundary"; BLD likewise; unknown kinds are refused."""
    amap, a, t_rows, s_rows, fn, logits = subset_case("gpt2", byte_queries=K)
    ids = a.student_ids
    g = torch.Generator().manual_seed(3)
    s = torch.randn(*ids.shape, amap.n_student, generator=g, requires_grad=True)
    kw = dict(kl_weight=1.0, ce_weight=0.0, top_k=None)
    default = L.likelihood_distillation_loss(s, logits, ids, a, amap, **kw)
    pre = L.likelihood_distillation_loss(s, logits, ids, a, amap, targets=L.likelihood_targets(logits, amap, a), **kw)
    boundary = L.LikelihoodDistillationLoss(amap, targets="boundary", **kw)(s, logits, ids, a)
    assert abs(default.item() - pre.item()) < 1e-5
    assert abs(default.item() - boundary.item()) > 1e-4
    head = torch.randn(*ids.shape, K, 257)
    bkw = dict(student_vocab=amap.student, teacher_vocab=amap.teacher, lambda_b=0.0, ce_weight=0.0, lambda_kl=1.0)
    b_exact = L.byte_level_distillation_loss(s, head, logits, ids, a, **bkw)
    b_fast = L.ByteLevelDistillationLoss(amap.student, amap.teacher, num_bytes=K, targets="boundary", lambda_b=0.0,
                                         ce_weight=0.0, lambda_kl=1.0)(s, head, logits, ids, a)
    assert abs(b_exact.item() - b_fast.item()) > 1e-4
    with pytest.raises(ValueError, match="targets must be one of"):
        L.likelihood_distillation_loss(s, logits, ids, a, amap, targets="exactly")
    with pytest.raises(ValueError, match="targets must be one of"):
        L.ByteLevelDistillationLoss(amap.student, amap.teacher, targets="fast")


def test_exact_share_in_the_general_regime():
    """llama3 -> mistral-v1: the exact positions are those whose student pieces of the current (and, at
    a boundary, the previous) teacher token are its dec_S pieces; the share is reported by the
    alignment's report and counted by cause; exact targets equal the boundary ones wherever the
    construction does not apply."""
    from ctalign.data import DistillationCollator
    amap = get_map("llama3", "mistral-v1")
    assert amap.regime == "general"
    b = DistillationCollator(amap)(TEXTS)
    a = b["alignment"]
    share = L.exact_share(amap, a)
    assert 0 < share["exact"] < share["predicted"]
    assert share["exact"] + share["crossing"] + share["not_dec_prefix"] + share["previous_split"] == share["predicted"]
    rep = a.report(amap)
    assert rep["exact_share"] == pytest.approx(share["share"]) and "exact targets" in str(rep)
    t = torch.randn(*b["teacher_input_ids"].shape, amap.n_teacher, generator=torch.Generator().manual_seed(1)) * 3
    ex = L.likelihood_targets(t, amap, a)
    fast = L.likelihood_targets(t, amap, a, targets="boundary")
    assert torch.equal(ex.valid, fast.valid)
    approx = ex.valid & ~ex.exact & a.s_at_boundary
    assert approx.any()
    assert torch.equal(ex.logprobs[approx], fast.logprobs[approx])
    rows = ex.logprobs[ex.valid]
    assert torch.allclose(torch.logsumexp(rows.double(), -1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-5)
