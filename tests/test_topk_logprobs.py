"""ops.topk_logprobs: dense logits -> TopK rows, against a brute-force definition (a stable sort of
the row by value, then id) on vocabulary-sized rows, on every backend, instruction set and dtype."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ctalign import ops
from ctalign.ops import _cpu_backend
from ctalign.ops import TopK

TOL = 1e-5
PAD = 7


def brute_topk(x: torch.Tensor, vocab_size: int, k: int, temperature: float = 1.0):
    """ids [N, k] (largest first, ties: smaller id first) and float64 log-probabilities, by definition."""
    ids, lps = [], []
    for row in x[:, :vocab_size].double().numpy():
        order = np.lexsort((np.arange(vocab_size), -row))[:k]
        lp = torch.log_softmax(torch.from_numpy(row) / temperature, 0).numpy()
        ids.append(order)
        lps.append(lp[order])
    return torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(lps))


def rows_of(vocab_size: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Rows that stress the selection: random, peaked, with many ties, rising, falling, a late peak
    with earlier ties; NaN padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, vocab_size + PAD, generator=g, dtype=torch.float64) * 3
    x[1, 1000:1010] += 25.0  # a peaked row: a few tokens hold nearly all the mass
    x[2] = torch.round(x[2] * 2) / 2  # many exact ties, also at the k-th value
    x[3, :vocab_size] = torch.linspace(-20, 20, vocab_size, dtype=torch.float64)  # rising: every column is a candidate
    x[4, :vocab_size] = torch.linspace(20, -20, vocab_size, dtype=torch.float64)
    x[5, :vocab_size] = 0.0  # all tied: the k smallest ids
    # a late peak among ties, and the same tied value earlier in the row: the kernel visits the peak's
    # chunk first, yet the k-th value's ties must go to the smaller ids, far before it
    x[6, :vocab_size] = 0.0
    x[6, vocab_size - 300: vocab_size - 100] = 1.0
    x[6, vocab_size - 50] = 10.0
    x[6, 5000:5200] = 1.0
    x[:, vocab_size:] = float("nan")  # padding columns are never read
    return x.to(dtype)


def assert_topk_equal(got: TopK, want_ids: torch.Tensor, want_lp: torch.Tensor, what: str):
    assert got.indices.dtype == torch.int64
    assert torch.equal(got.indices, want_ids), f"{what}: ids differ in {int((got.indices != want_ids).sum())} places"
    err = (got.logprobs.double() - want_lp).abs().max().item()
    assert err <= TOL, f"{what}: max log-probability error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_brute_force_on_vocabulary_sized_rows(load_test_vocab, dtype, temperature):
    V = len(load_test_vocab("qwen"))  # 151,851 columns, plus padding
    x = rows_of(V, dtype)
    k = 64
    want_ids, want_lp = brute_topk(x, V, k, temperature)
    got = ops.topk_logprobs(x, k, vocab_size=V, temperature=temperature)
    assert ops.last_backend() == "cpu"
    assert_topk_equal(got, want_ids, want_lp, f"compiled {dtype}")
    with ops.force_backend("reference"):
        ref = ops.topk_logprobs(x, k, vocab_size=V, temperature=temperature)
        assert ops.last_backend() == "reference"
    assert_topk_equal(ref, want_ids, want_lp, f"reference {dtype}")


def test_every_instruction_set_and_thread_count_gives_the_same_rows():
    V = 50_000
    x = rows_of(V, torch.float32, seed=3)
    want_ids, want_lp = brute_topk(x, V, 100)
    isas = ["scalar", "avx2", "avx512"]
    best = isas.index(_cpu_backend.kernel_isa())
    try:
        for isa in isas[: best + 1]:
            for threads in (1, 2, 3):
                _cpu_backend.set_kernel_isa(isa)
                _cpu_backend.set_num_threads(threads)
                for dtype in (torch.float32, torch.bfloat16):
                    xd = x.to(dtype)
                    ids, lp = brute_topk(xd, V, 100) if dtype != torch.float32 else (want_ids, want_lp)
                    assert_topk_equal(ops.topk_logprobs(xd, 100, vocab_size=V), ids, lp, f"{isa} x{threads} {dtype}")
    finally:
        _cpu_backend.set_kernel_isa(None)
        _cpu_backend.set_num_threads(None)


@settings(max_examples=40, deadline=None)
@given(n_rows=st.integers(1, 5), vocab_size=st.integers(1, 3000), k_share=st.floats(0.0, 1.0),
       levels=st.integers(1, 50), temperature=st.floats(0.3, 3.0), seed=st.integers(0, 2**16))
def test_property_small_rows_with_ties(n_rows, vocab_size, k_share, levels, temperature, seed):
    """Integer-valued rows (few distinct values: ties everywhere) and any k in [1, V]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n_rows, vocab_size + 2), generator=g).float()
    k = max(1, min(vocab_size, round(k_share * vocab_size)))
    want_ids, want_lp = brute_topk(x, vocab_size, k, temperature)
    assert_topk_equal(ops.topk_logprobs(x, k, vocab_size=vocab_size, temperature=temperature), want_ids, want_lp,
                      "compiled")
    with ops.force_backend("reference"):
        assert_topk_equal(ops.topk_logprobs(x, k, vocab_size=vocab_size, temperature=temperature), want_ids, want_lp,
                          "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ties_at_zero_with_subnormals_flushed(dtype):
    """Zeros with a late peak: the peak's chunk is visited first, so the k-th value is 0 and the tied
    zeros before it must still win on their smaller ids, also with flush-to-zero on (where the float
    just below 0 reads as 0)."""
    x = torch.zeros(3, 4096 + PAD, dtype=dtype)
    x[:, 3000] = 1.0
    x[1, :100] = -0.0
    x[2, 2048:] = -float("inf")
    x[2, 3000] = 1.0
    x[:, 4096:] = float("nan")
    want_ids, want_lp = brute_topk(x, 4096, 3)
    isas = ["scalar", "avx2", "avx512"]
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            for isa in isas[: isas.index(_cpu_backend.kernel_isa()) + 1]:
                _cpu_backend.set_kernel_isa(isa)
                assert_topk_equal(ops.topk_logprobs(x, 3, vocab_size=4096), want_ids, want_lp,
                                  f"{isa} flush={flush}")
    finally:
        torch.set_flush_denormal(False)  # torch's default
        _cpu_backend.set_kernel_isa(None)


def test_negative_infinity_columns_have_no_mass():
    x = torch.full((3, 40), float("-inf"))
    x[0, [5, 9, 30]] = torch.tensor([1.0, 3.0, 2.0])  # three finite columns, k = 5
    x[1] = torch.arange(40.0)
    x[2, 7] = 0.0
    for backend in (None, "reference"):
        with ops.force_backend(backend):
            got = ops.topk_logprobs(x, 5)
        want_ids, want_lp = brute_topk(x, 40, 5)
        assert torch.equal(got.indices, want_ids)
        assert torch.equal(torch.isneginf(got.logprobs), torch.isneginf(want_lp))
        finite = torch.isfinite(want_lp)
        assert (got.logprobs.double()[finite] - want_lp[finite]).abs().max() < TOL
        assert got.indices[0].tolist() == [9, 30, 5, 0, 1]


def test_k_covering_the_vocabulary_feeds_the_sparse_ops(load_test_vocab):
    """TopK rows made by topk_logprobs with k = V give the dense results of the other ops (a real pair)."""
    from ctalign import build_map
    teacher, student = load_test_vocab("botchan-bpe"), load_test_vocab("botchan-unigram")
    amap = build_map(teacher, student)
    V = len(teacher)
    x = rows_of(V)[:3]
    rows = ops.topk_logprobs(x, V, vocab_size=V)
    assert torch.equal(rows.indices.sort(-1).values, torch.arange(V).expand(3, V))
    dense = ops.project_to_student(x, amap)
    sparse = ops.project_to_student(rows, amap)
    finite = torch.isfinite(dense)
    assert torch.equal(finite, torch.isfinite(sparse))
    assert (dense[finite] - sparse[finite]).abs().max() < TOL
    nb_dense, nb_sparse = ops.next_byte_logprobs(x, teacher), ops.next_byte_logprobs(rows, teacher)
    finite = torch.isfinite(nb_dense)
    assert (nb_dense[finite] - nb_sparse[finite]).abs().max() < TOL


def test_leading_dimensions_and_strided_rows():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 1000, generator=g) * 3
    got = ops.topk_logprobs(x, 10, vocab_size=990)
    assert got.indices.shape == got.logprobs.shape == (2, 3, 10)
    flat = ops.topk_logprobs(x.reshape(6, 1000), 10, vocab_size=990)
    assert torch.equal(got.indices.reshape(6, 10), flat.indices)
    strided = torch.randn(4, 2000, generator=g)[:, ::2]  # last dimension not contiguous
    assert torch.equal(ops.topk_logprobs(strided, 7).indices, brute_topk(strided.contiguous(), 1000, 7)[0])
    x0 = torch.randn(0, 50, requires_grad=True)
    empty = ops.topk_logprobs(x0, torch.tensor(3))  # k may be a 0-d integer tensor
    assert empty.indices.shape == empty.logprobs.shape == (0, 3)
    empty.logprobs.sum().backward()  # still connected to the logits
    assert x0.grad.shape == (0, 50)


def test_selected_rows_only_are_read():
    """rows: outputs in the given order, repeats allowed; rows not listed may hold anything (NaN)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5000, generator=g) * 3
    x[2] = float("nan")
    rows = [4, 0, 4, 5]
    want_ids, want_lp = brute_topk(x[rows], 5000, 30)
    for backend in (None, "reference"):
        with ops.force_backend(backend):
            got = ops.topk_logprobs(x, 30, rows=torch.tensor(rows))
        assert got.indices.shape == (4, 30)
        assert_topk_equal(got, want_ids, want_lp, f"rows, {backend or 'compiled'}")
    three_d = ops.topk_logprobs(x.reshape(2, 3, 5000), 30, rows=rows)  # ids of the flattened rows
    assert torch.equal(three_d.indices, want_ids)
    # gradients: repeated rows add up, rows not listed get zeros
    w = torch.randn(4, 30, generator=g)
    grads = []
    for backend in (None, "reference"):
        xi = x.clone().requires_grad_()
        with ops.force_backend(backend):
            (ops.topk_logprobs(xi, 30, rows=rows, temperature=0.8).logprobs * w).sum().backward()
        grads.append(xi.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=2e-6)
    assert not grads[0][[1, 2, 3]].any()
    with pytest.raises(ValueError, match=r"rows\[1\] = 6 is outside \[0, 6\)"):
        ops.topk_logprobs(x, 3, rows=[0, 6])


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_gradients(temperature):
    x = (torch.randn(3, 41, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: ops.topk_logprobs(t, 6, vocab_size=37, temperature=temperature).logprobs, (x,))
    # compiled gradient = autograd of the pure-torch path, float32, wide rows; padding gets zero
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 30_000 + PAD, generator=g) * 3
    w = torch.randn(4, 50, generator=g)
    grads = []
    for backend in (None, "reference"):
        xi = x.clone().requires_grad_()
        with ops.force_backend(backend):
            (ops.topk_logprobs(xi, 50, vocab_size=30_000, temperature=temperature).logprobs * w).sum().backward()
        grads.append(xi.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=2e-6)  # float32 gradients of size up to |w|
    assert not grads[0][:, 30_000:].any()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match=r"k = 0 is outside \[1, 100\]"):
        ops.topk_logprobs(x, 0)
    with pytest.raises(ValueError, match=r"k = 101 is outside \[1, 100\]"):
        ops.topk_logprobs(x, 101)
    with pytest.raises(ValueError, match=r"k = 60 is outside \[1, 50\]"):
        ops.topk_logprobs(x, 60, vocab_size=50)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk_logprobs(x, 2.5)
    with pytest.raises(ValueError, match="width 100 is smaller than vocab_size"):
        ops.topk_logprobs(x, 5, vocab_size=200)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.topk_logprobs(torch.zeros(2, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="temperature"):
        ops.topk_logprobs(x, 5, temperature=0.0)
    for bad, what in ((float("nan"), "NaN"), (float("inf"), "+inf")):
        y = x.clone()
        y[2, 17] = bad
        for backend in (None, "reference"):
            with ops.force_backend(backend), pytest.raises(ValueError, match="logits row 2 holds NaN or \\+inf"):
                ops.topk_logprobs(y, 5)
    y = x.clone()
    y[1] = float("-inf")
    for backend in (None, "reference"):
        with ops.force_backend(backend), pytest.raises(ValueError, match="logits row 1 .*only -inf"):
            ops.topk_logprobs(y, 5)
    with pytest.raises(ValueError, match="row 0 .*overflows at this temperature"):
        ops.topk_logprobs(torch.full((1, 10), 1e38), 2, temperature=1e-3)
