"""-inf logits are zero mass everywhere (#15): dense rows with -inf entries (masked vocabularies,
logit processors) give what the same rows give with those entries at a finite value far below the
rest, on the compiled CPU kernels and the pure-torch reference, ops and losses alike; NaN, +inf and
rows without a finite entry stay errors."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from test_losses import batch, get_map  # noqa: E402

from ctalign import losses as L, ops  # noqa: E402
from ctalign.errors import NonFiniteLogitsError  # noqa: E402

PAIR = ("llama3", "mistral-v1")


def _rows(amap, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, amap.n_teacher + 3, generator=g) * 3
    masked = torch.rand(n, amap.n_teacher + 3, generator=g) < 0.3
    masked[:, :10] = False  # every row keeps finite entries
    return x.masked_fill(masked, float("-inf")), x.masked_fill(masked, -1e30)


def _calls(amap):
    tv = amap.teacher
    rows, nodes = torch.tensor([0, 1, 2, 3]), torch.tensor([0, int(tv.trie.lookup(b"th")), int(tv.trie.lookup(b" a")), 0])
    return {
        "next_byte": lambda x: ops.next_byte_logprobs(x, tv),
        "byte_conditional": lambda x: ops.byte_conditional_logprobs(x, tv, rows, nodes),
        "project": lambda x: ops.project_to_student(x, amap),
        "project_within": lambda x: ops.project_to_student_within(x, amap, rows, torch.zeros(4, dtype=torch.int64)),
        "cover": lambda x: ops.cover_logmass(x, amap),
    }


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_neg_inf_entries_are_zero_mass_in_every_op(backend):
    amap = get_map(*PAIR)
    x_inf, x_far = _rows(amap)
    for name, fn in _calls(amap).items():
        with ops.force_backend(backend):
            got = fn(x_inf)
            want = fn(x_far)
            assert ops.last_backend() == backend
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        fin = torch.isfinite(want)
        assert torch.allclose(got[fin], want[fin], atol=1e-5), name
        # gradients: finite, and none on the masked logits
        xg = x_inf.clone().requires_grad_(True)
        with ops.force_backend(backend):
            out = fn(xg)
        out.masked_fill(~torch.isfinite(out), 0.0).sum().backward()
        assert torch.isfinite(xg.grad).all(), name
        assert (xg.grad[~torch.isfinite(x_inf)] == 0).all(), name


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nan_pos_inf_and_rows_without_a_finite_entry_stay_errors(backend):
    amap = get_map(*PAIR)
    x, _ = _rows(amap)
    for bad in ("nan", "inf", "all -inf"):
        y = x.clone()
        if bad == "all -inf":
            y[2] = float("-inf")
        else:
            y[2, 3] = float(bad)
        for name, fn in _calls(amap).items():
            with ops.force_backend(backend), pytest.raises(NonFiniteLogitsError, match="row 2"):
                fn(y)


def test_losses_accept_masked_teacher_vocabularies():
    """The likelihood and BLD losses (exact and boundary targets) take teacher rows with -inf entries and
    give the value of the same rows with those entries far below the rest."""
    amap = get_map(*PAIR)
    b = batch(*PAIR, K=4)
    g = torch.Generator().manual_seed(5)
    t = torch.randn(*b["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 3
    masked = torch.rand(t.shape, generator=g) < 0.3
    masked[..., :10] = False
    t_inf, t_far = t.masked_fill(masked, float("-inf")), t.masked_fill(masked, -1e30)
    s = torch.randn(*b["student_input_ids"].shape, amap.n_student, generator=g, requires_grad=True)
    head = torch.randn(*s.shape[:2], 4, 257)
    ids, a = b["student_input_ids"], b["alignment"]
    for targets in ("exact", "boundary"):
        lk = [L.likelihood_distillation_loss(s, x, ids, a, amap, targets=targets).item() for x in (t_inf, t_far)]
        bl = [L.byte_level_distillation_loss(s, head, x, ids, a, student_vocab=amap.student, teacher_vocab=amap.teacher,
                                             targets=targets).item() for x in (t_inf, t_far)]
        assert abs(lk[0] - lk[1]) < 1e-4 and abs(bl[0] - bl[1]) < 1e-4, (targets, lk, bl)
