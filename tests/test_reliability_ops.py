"""The ops stay finite for every finite input, at any spread of logits (issue #21): the compiled CPU
kernels against the float64 reference. Found by the fuzz campaign (tests/fuzz, format ``ops``): at
spreads of 1e9 after the temperature the kernels return -inf for groups holding almost all the
mass, and at 1e28 NaN. The kernels are being restructured (cpp/projection_kernels.cpp ->
cpp/kernels/) by another engineer; these stay xfail until that lands and the fix goes in there."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def small_map(load_test_vocab):
    from ctalign import build_map
    return build_map(load_test_vocab("botchan-bpe"), load_test_vocab("botchan-unigram"))


@pytest.mark.xfail(reason="kernels lose finite masses at extreme spreads (#21); cpp/ is being split by the "
                          "kernel engineer, fix pending there", strict=True)
@pytest.mark.parametrize("spread, temperature", [(1e6, 1e-3), (1e30, 100.0), (1e30, 1e-3)])
def test_grouped_logmass_is_finite_at_any_spread(small_map, spread, temperature):
    from ctalign.ops import _cpu_backend as cpu
    from ctalign.ops import reference as ref
    V = small_map.n_teacher
    x = torch.randn(4, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * spread
    x = x.float()
    group = torch.as_tensor(small_map.first_byte)
    out, lse = cpu.grouped_logmass(x, V, group, 257, temperature)
    want, _ = ref.grouped_logmass(x.double(), V, group, 257, temperature)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    sig = want > -12
    assert torch.allclose(out.double()[sig], want[sig], atol=1e-3)
    assert torch.equal(torch.isinf(out), torch.isinf(want))
