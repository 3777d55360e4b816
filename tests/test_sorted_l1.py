"""ops.sorted_l1_distance (ULD's exact distance by compiled radix sorts) against its torch.sort
definition: values and gradients, ties, zeros, widths either way round, bad input; and the exact ULD
loss on a real pair, compiled against the pure-torch path."""
from __future__ import annotations

import pytest
import torch

from ctalign import losses as L
from ctalign import ops
from ctalign.ops import reference


def _both(ps, pt):
    a = ps.detach().clone().requires_grad_()
    d = ops.sorted_l1_distance(a, pt)
    assert ops.last_backend() == "cpu"
    (d * torch.arange(1, len(d) + 1)).sum().backward()
    b = ps.detach().clone().requires_grad_()
    r = reference.sorted_l1_distance(b, pt)
    (r * torch.arange(1, len(r) + 1)).sum().backward()
    return d, a.grad, r, b.grad


@pytest.mark.parametrize("vs, vt", [(1, 1), (7, 3), (3, 7), (5000, 70001), (70001, 5000)])
def test_equals_its_definition(vs, vt):
    g = torch.Generator().manual_seed(vs * 7 + vt)
    ps = torch.softmax(torch.randn(4, vs, generator=g) * 4, -1)
    pt = torch.softmax(torch.randn(4, vt, generator=g) * 4, -1)
    d, gd, r, gr = _both(ps, pt)
    assert torch.allclose(d.double(), r.double(), rtol=1e-6, atol=1e-7)
    assert torch.equal(gd, gr)


def test_ties_and_zeros_give_the_same_distance_and_a_valid_gradient():
    ps = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    pt = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]])
    d, gd, r, gr = _both(ps, pt)
    assert torch.allclose(d, r)
    assert torch.allclose(d, torch.tensor([0.5, 1.0]))
    # ties rank by column id (stable): row 0 pairs its 0.25s with 0.5, 0.25, 0.25, 0; row 1 its 1.0 with
    # 0.5 and its first zero (column 0) with the other 0.5 (the rows' weights are 1 and 2)
    assert gd.tolist() == [[-1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [-2.0, 2.0, 0.0, 0.0, 0.0, 0.0]]


def test_bad_rows_are_refused():
    ok = torch.full((1, 4), 0.25)
    for bad in (float("nan"), float("inf"), -0.5):
        x = ok.clone()
        x[0, 2] = bad
        with pytest.raises(ValueError, match="probabilities must be finite and >= 0"):
            ops.sorted_l1_distance(x, ok)
        with pytest.raises(ValueError, match="probabilities must be finite and >= 0"):
            ops.sorted_l1_distance(ok, x)
    with pytest.raises(ValueError, match=r"\[N, V_s\] and \[N, V_t\]"):
        ops.sorted_l1_distance(ok, torch.full((2, 4), 0.25))


def test_exact_uld_on_a_real_pair_compiled_equals_the_torch_path(load_test_vocab):
    from ctalign import build_map
    from ctalign.data import DistillationCollator
    tv, sv = load_test_vocab("llama3"), load_test_vocab("mistral-v1")
    amap = build_map(tv, sv)
    b = DistillationCollator(amap)(["The quick brown fox jumps over the lazy dog, twice.", "To be, or not to be."])
    g = torch.Generator().manual_seed(0)
    t = torch.randn(*b["teacher_input_ids"].shape, len(tv), generator=g) * 3
    s = (torch.randn(*b["student_input_ids"].shape, len(sv), generator=g) * 3).requires_grad_()
    kw = dict(alignment=b["alignment"], student_mask=b["student_loss_mask"], teacher_mask=b["teacher_loss_mask"],
              align="byte", student_vocab_size=len(sv), teacher_vocab_size=len(tv), temperature=1.5)
    got = L.uld_loss(s, t, b["student_input_ids"], **kw)
    got.backward()
    grad, s.grad = s.grad.clone(), None
    with ops.force_backend("reference"):
        want = L.uld_loss(s, t, b["student_input_ids"], **kw)
    want.backward()
    assert abs(got.item() - want.item()) < 1e-6 * max(1.0, abs(want.item()))
    assert torch.allclose(grad, s.grad, atol=1e-7)


def test_exact_uld_names_a_bad_row_by_side_and_position(load_test_vocab):
    """The compiled exact path (softmaxes in the kernel) refuses NaN / +inf / all -inf rows as the torch
    path does, naming the side, batch and position."""
    from ctalign import build_map
    from ctalign.data import DistillationCollator
    from ctalign.errors import NonFiniteLogitsError
    tv, sv = load_test_vocab("llama3"), load_test_vocab("mistral-v1")
    amap = build_map(tv, sv)
    b = DistillationCollator(amap)(["The quick brown fox jumps over the lazy dog.", "To be, or not to be."])
    g = torch.Generator().manual_seed(1)
    t = torch.randn(*b["teacher_input_ids"].shape, len(tv), generator=g)
    s = torch.randn(*b["student_input_ids"].shape, len(sv), generator=g)
    kw = dict(student_mask=b["student_loss_mask"], teacher_mask=b["teacher_loss_mask"], student_vocab_size=len(sv),
              teacher_vocab_size=len(tv))
    bj = torch.nonzero(b["student_loss_mask"])[3]
    s_bad = s.clone()
    s_bad[bj[0], bj[1] - 1, 11] = float("inf")
    t_bad = t.clone()
    tj = torch.nonzero(b["teacher_loss_mask"])[2]
    t_bad[tj[0], tj[1] - 1] = float("-inf")
    for backend in (None, "reference"):
        with ops.force_backend(backend), pytest.raises(
                NonFiniteLogitsError, match=f"student logits at batch {int(bj[0])}, position {int(bj[1]) - 1}") as err:
            L.uld_loss(s_bad, t, b["student_input_ids"], **kw)
        assert err.value.row == int(bj[0]) * s.shape[1] + int(bj[1]) - 1
        with ops.force_backend(backend), pytest.raises(
                NonFiniteLogitsError, match=f"teacher logits at batch {int(tj[0])}, position {int(tj[1]) - 1}"):
            L.uld_loss(s, t_bad, b["student_input_ids"], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_form_equals_softmax_then_sort(dtype):
    """The kernel's logits form (rows by index, padded widths, each side's temperature, a repeated student
    row) against softmax + reference.sorted_l1_distance: value and gradient, in the logits' dtype."""
    from ctalign.ops._autograd import _SortedL1Logits
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 300, generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randn(5, 700, generator=g) * 2
    sr, tr = torch.tensor([0, 2, 5, 2]), torch.tensor([1, 1, 4, 0])
    d, bad = _SortedL1Logits.apply(x, sr, 290, 1.3, t, tr, 690, 0.7)
    assert not bad.any()
    (d * torch.arange(1.0, 5.0)).sum().backward()
    x64 = x.detach().double().requires_grad_()
    want = reference.sorted_l1_distance(torch.softmax(x64[sr, :290] / 1.3, -1), torch.softmax(t[tr, :690].double() / 0.7, -1))
    (want * torch.arange(1.0, 5.0, dtype=torch.float64)).sum().backward()
    assert x.grad.dtype == dtype
    assert torch.allclose(d.double(), want, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert torch.allclose(x.grad.double(), x64.grad, atol=tol)
    assert (x.grad[:, 290:] == 0).all() and (x.grad[[1, 3, 4]] == 0).all()
