"""The ops stay finite for every finite input, at any spread of logits (issue #21): the compiled CPU
kernels against the float64 reference, on every instruction set and logits dtype. Found by the fuzz
campaign (tests/fuzz, format ``ops_extreme``): once |x/T| passed ~2^22 the shift of the exponents,
rounded to float, was off by more than the top tokens' spread (ulp 64 at 1e9), so e^(x/T - shift)
overflowed or vanished for the top token: -inf for groups holding almost all the mass, or NaN. The
kernels now split such shifts into a raw logit and a lead (cpp/kernels/common.h, Shift)."""
from __future__ import annotations

import pytest
import torch

from ctalign import _core

ISAS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(_core.best_kernel_isa()) + 1]
# (spread, temperature): x/T from 1e9 to 1e33, plus a moderate case that must stay as it was
CASES = [(1e6, 1e-3), (1e10, 100.0), (1e30, 100.0), (1e30, 1e-3), (3e4, 1e-3), (10.0, 1.0)]


@pytest.fixture(scope="module")
def small_map(load_test_vocab):
    from ctalign import build_map
    return build_map(load_test_vocab("botchan-bpe"), load_test_vocab("botchan-unigram"))


@pytest.fixture
def isa(request):
    from ctalign.ops import _cpu_backend as cpu
    cpu.set_kernel_isa(request.param)
    yield request.param
    cpu.set_kernel_isa(None)


def _logits(n, V, spread, dtype, seed=0, shape=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g, dtype=torch.float64) * spread
    if shape == 1:  # one huge logit
        x[:, 7] += spread * 10
    elif shape == 2:  # a few far-below columns and ties at the top
        x[:, :10] = -spread * 50
        x[:, 20:23] = x.amax(dim=-1, keepdim=True) + spread
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype)


def _assert_matches(out, want, dtype, what):
    out = out.double()
    assert not torch.isnan(out).any(), f"{what}: NaN"
    assert not (torch.isinf(out) & (want > -60)).any(), f"{what}: -inf where the reference is finite"
    sig = want > -12
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    err = (out - want).abs()[sig]
    assert err.numel() == 0 or err.max().item() <= tol, f"{what}: off by {err.max().item():.3g}"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("spread, temperature", CASES)
def test_dense_ops_are_finite_at_any_spread(small_map, isa, dtype, spread, temperature):
    from ctalign.ops import _cpu_backend as cpu
    from ctalign.ops import reference as ref
    if dtype == torch.float16 and spread > 3e4:
        pytest.skip("beyond fp16's range")
    V = small_map.n_teacher
    byte_group = torch.as_tensor(small_map.first_byte)
    student_group = torch.as_tensor(small_map.first_student)
    order = torch.as_tensor(small_map.teacher_order)
    lo, hi = torch.as_tensor(small_map.cover_lo)[None], torch.as_tensor(small_map.cover_hi)[None]
    for shape in range(3):
        for n in (9,):  # one eight-row block and one single row
            x = _logits(n, V + 3, spread, dtype, seed=shape, shape=shape)
            x64 = x.double()
            if not torch.isfinite(x.float() / temperature).all():
                continue
            what = f"{isa} {dtype} spread {spread} T {temperature} shape {shape} rows {n}"
            for group, G in ((byte_group, 257), (student_group, small_map.n_student + 1)):
                out, lse = cpu.grouped_logmass(x, V, group, G, temperature)
                want, want_lse = ref.grouped_logmass(x64, V, group, G, temperature)
                _assert_matches(out, want, dtype, f"grouped G={G} {what}")
                assert torch.allclose(lse.double(), want_lse, rtol=1e-6, atol=1e-3), what
            out, lse = cpu.range_logmass(x, V, order, None, lo, hi, temperature)
            want, _ = ref.range_logmass(x64, V, order, None, lo, hi, temperature)
            _assert_matches(out, want, dtype, f"range {what}")
            ids, lp, lse = cpu.topk_logprobs(x, V, None, 5, temperature)
            want_ids, want_lp, _ = ref.topk_logprobs(x64, V, None, 5, temperature)
            assert torch.equal(ids, want_ids), what
            _assert_matches(lp, want_lp, dtype, f"topk {what}")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("spread, temperature", [(1e6, 1e-3), (1e30, 100.0), (1e4, 1.0)])
def test_grouped_and_topk_gradients_at_any_spread(small_map, isa, spread, temperature):
    """The backward rows whose float lse cannot place the top tokens recompute their normaliser."""
    from ctalign.ops import _cpu_backend as cpu
    from ctalign.ops import reference as ref
    V = small_map.n_teacher
    group = torch.as_tensor(small_map.first_byte)
    for n in (3, 9):
        x = _logits(n, V, spread, torch.float32, seed=n, shape=2)
        x[:, 40:42] = x.amax(dim=-1, keepdim=True) - 1e-6 * spread  # near the top: a spread of mass
        out, lse = cpu.grouped_logmass(x, V, group, 257, temperature)
        g = torch.randn(n, 257, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        g = torch.where(torch.isinf(out), torch.zeros_like(g), g)
        grad = cpu.grouped_logmass_backward(x, V, group, 257, temperature, out, lse, g.float())
        x64 = x.double().requires_grad_(True)
        want, _ = ref.grouped_logmass(x64, V, group, 257, temperature)
        (want.masked_fill(torch.isinf(want), 0) * g).sum().backward()
        scale = x64.grad.abs().max().item()
        assert torch.isfinite(grad).all()
        assert (grad.double() - x64.grad).abs().max().item() <= 1e-3 * scale + 1e-12, f"{isa} grouped rows {n}"

        ids, lp, lse = cpu.topk_logprobs(x, V, None, 4, temperature)
        gk = torch.randn(n, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        grad = cpu.topk_logprobs_backward(x, V, None, ids, temperature, lse, gk.float())
        x64 = x.double().requires_grad_(True)
        _, want_lp, _ = ref.topk_logprobs(x64, V, None, 4, temperature)
        (want_lp * gk).sum().backward()
        scale = x64.grad.abs().max().item()
        assert torch.isfinite(grad).all()
        assert (grad.double() - x64.grad).abs().max().item() <= 1e-3 * scale + 1e-12, f"{isa} topk rows {n}"


@pytest.mark.parametrize("backend", [None, "reference"])
def test_topk_rows_with_nan_or_inf_raise_nonfinite_logits_error_naming_the_row(small_map, backend):
    """Found by the fuzz campaign's ops_sparse format: TopK rows with NaN or +inf raised a plain
    ValueError where dense rows raise NonFiniteLogitsError (with .row)."""
    from ctalign import ops
    from ctalign.errors import NonFiniteLogitsError
    idx = torch.tensor([[3, 5, 9], [1, 2, 4]])
    for bad in (float("nan"), float("inf")):
        lp = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1).float()
        lp[1, 2] = bad
        rows = ops.TopK(idx, lp)
        calls = {"next_byte": lambda: ops.next_byte_logprobs(rows, small_map),
                 "project": lambda: ops.project_to_student(rows, small_map),
                 "project sparse": lambda: ops.project_to_student(rows, small_map, sparse=True),
                 "cover": lambda: ops.cover_logmass(rows, small_map),
                 "cover sparse": lambda: ops.cover_logmass(rows, small_map, sparse=True)}
        for name, call in calls.items():
            with ops.force_backend(backend), pytest.raises(NonFiniteLogitsError, match="row 1") as info:
                call()
            assert info.value.row == 1, name
