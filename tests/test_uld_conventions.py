"""ULD's options for the reference implementations' conventions (per-example mean, separate CE and
distance masks, one temperature per side), each against its definition in float64 on a real pair of
different families (mistral-v1 -> botchan-bpe)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_losses import paired_targets, uld_case  # noqa: E402

from ctalign import losses as L  # noqa: E402


def _w1(s, t, r, j, k, Vs, Vt, Ts=1.0, Tt=1.0, top_k=None):
    ps = torch.softmax(s.detach()[r, j - 1, :Vs].double() / Ts, -1)
    pt = torch.softmax(t[r, k - 1, :Vt].double() / Tt, -1)
    if top_k is None:
        a, b = np.sort(ps.numpy())[::-1], np.sort(pt.numpy())[::-1]
        a = np.pad(a, (0, max(0, len(b) - len(a))))
        b = np.pad(b, (0, max(0, len(a) - len(b))))
        return float(np.abs(a - b).sum())
    a, b = ps.topk(top_k).values, pt.topk(top_k).values
    return float((a - b).abs().sum() + ((1 - a.sum()) - (1 - b.sum())).abs())


def _ce(s, ids, mask, Vs):
    rows = torch.nonzero(mask).tolist()
    return -sum(float(torch.log_softmax(s.detach()[r, j - 1, :Vs].double(), -1)[ids[r, j]]) for r, j in rows) / len(rows)


def test_uld_per_example_mean():
    """distance_mean='examples': mean over each example's pairs, then over the examples (the peers'
    reduction), not over all pairs of the batch; 'none' rows sum to the example means."""
    b, Vt, Vs, t, s, sm, tm = uld_case(31, 32)
    per: dict[int, list[float]] = {}
    for r, j, k in paired_targets(sm, tm):
        per.setdefault(r, []).append(_w1(s, t, r, j, k, Vs, Vt))
    assert len({len(v) for v in per.values()}) > 1  # examples of different lengths: the two means differ
    want = float(np.mean([np.mean(v) for v in per.values()]))
    kw = dict(student_mask=sm, teacher_mask=tm, student_vocab_size=Vs, ce_weight=0.0)
    got = L.uld_loss(s, t, b["student_input_ids"], distance_mean="examples", **kw)
    assert abs(got.item() - want) < 1e-5, (got.item(), want)
    pairs_mean = L.uld_loss(s, t, b["student_input_ids"], **kw)
    assert abs(pairs_mean.item() - want) > 1e-3
    none = L.ULDLoss(ce_weight=0.0, student_vocab_size=Vs, reduction="none", distance_mean="examples")(
        s, t, b["student_input_ids"], None, sm, tm)
    for r, v in per.items():
        assert abs(none[r].sum().item() - np.mean(v)) < 1e-5
    # with the CE: the CE keeps its token mean
    both = L.uld_loss(s, t, b["student_input_ids"], distance_mean="examples", student_mask=sm, teacher_mask=tm,
                      student_vocab_size=Vs)
    assert abs(both.item() - (want + _ce(s, b["student_input_ids"], sm, Vs))) < 1e-4


def test_uld_separate_ce_and_distance_masks():
    """ce_mask: the CE scores the loss tokens eos included while the distance skips the student eos
    (llm-recipes' training config)."""
    b, Vt, Vs, t, s, sm, tm = uld_case(33, 34)
    ids = b["student_input_ids"]
    eos = _eos_id(b)
    dist_mask = sm & (ids != eos)
    assert (sm & (ids == eos)).any()
    w1 = [_w1(s, t, r, j, k, Vs, Vt) for r, j, k in paired_targets(dist_mask, tm)]
    want = _ce(s, ids, sm, Vs) + float(np.mean(w1))
    got = L.uld_loss(s, t, ids, student_mask=dist_mask, teacher_mask=tm, ce_mask=sm, student_vocab_size=Vs)
    assert abs(got.item() - want) < 1e-4, (got.item(), want)
    one_mask = L.uld_loss(s, t, ids, student_mask=dist_mask, teacher_mask=tm, student_vocab_size=Vs)
    assert abs(one_mask.item() - want) > 1e-4  # without ce_mask the CE loses the eos tokens


def _eos_id(b):
    from test_losses import get_map
    return get_map("mistral-v1", "botchan-bpe").student.special_ids["eos"]


@pytest.mark.parametrize("top_k", [None, 24])
def test_uld_separate_temperatures(top_k):
    """student_temperature / teacher_temperature: each side's softmax at its own temperature (dense and
    the compiled top-k path), value and gradient."""
    b, Vt, Vs, t, s, sm, tm = uld_case(35, 36)
    Ts, Tt = 0.7, 1.6
    w1 = [_w1(s, t, r, j, k, Vs, Vt, Ts, Tt, top_k) for r, j, k in paired_targets(sm, tm)]
    want = float(np.mean(w1))
    kw = dict(student_mask=sm, teacher_mask=tm, student_vocab_size=Vs, ce_weight=0.0, top_k=top_k)
    got = L.uld_loss(s, t, b["student_input_ids"], student_temperature=Ts, teacher_temperature=Tt, **kw)
    assert abs(got.item() - want) < 1e-5, (got.item(), want)
    same = L.uld_loss(s, t, b["student_input_ids"], temperature=Ts, **kw)
    assert abs(same.item() - want) > 1e-3
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher_temperature"):
        L.uld_loss(s, t, b["student_input_ids"], teacher_temperature=0.0, **kw)
