"""The pure-torch reference (ctalign.reference) against plain float64 numpy definitions, on real
vocabularies (botchan BPE 1k, mistral-v1 32k): grouped and range log masses, the direct-sum rule
for small ranges, sparse rows, temperature, and NaN-free gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctalign import reference

NEG_INF = float("-inf")


@pytest.fixture(scope="module", params=["botchan-bpe", "mistral-v1"])
def vocab(request, load_test_vocab):
    return load_test_vocab(request.param)


def trie_tables(vocab):
    t = vocab.trie
    return (torch.from_numpy(np.array(t.first_symbol)), torch.from_numpy(np.array(t.order)),
            torch.from_numpy(np.array(t.rank)).long(), t)


def probs64(x: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> np.ndarray:
    y = x[:, :vocab_size].double().numpy() / temperature
    y = y - y.max(axis=1, keepdims=True)
    p = np.exp(y)
    return p / p.sum(axis=1, keepdims=True)


def logs(m: np.ndarray) -> np.ndarray:
    out = np.full(m.shape, NEG_INF)
    np.log(m, out=out, where=m > 0)
    return out


def assert_close(got: torch.Tensor, want: np.ndarray, tol: float | None = None):
    """Equal -inf pattern; finite values within a few ulp of the output dtype (float32: 2e-6 at |x|~20)."""
    if tol is None:
        tol = 1e-9 if got.dtype == torch.float64 else 1e-7 * max(10.0, float(np.abs(want[np.isfinite(want)]).max(initial=0)))
    got = got.double().numpy()
    assert not np.isnan(got).any()
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert np.abs(got[finite] - want[finite]).max(initial=0) <= tol


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_logmass_is_the_log_mass_of_each_group(vocab, temperature, dtype):
    group, _, _, _ = trie_tables(vocab)
    V = len(vocab)
    x = (torch.randn(3, V + 5, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    out, lse = reference.grouped_logmass(x, V, group, 257, temperature)
    assert out.dtype == dtype and lse.dtype == dtype
    p = probs64(x, V, temperature)
    want = np.zeros((3, 257))
    for t in range(V):  # the definition, token by token
        want[:, group[t]] += p[:, t]
    assert_close(out, logs(want))
    assert torch.allclose(lse.double(), torch.logsumexp(x[:, :V].double() / temperature, -1), atol=1e-5)


def test_range_logmass_sums_ranges_of_the_sorted_order(vocab):
    _, order, _, trie = trie_tables(vocab)
    V, M = len(vocab), len(order)
    x = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 2
    rng = np.random.default_rng(0)
    lo = rng.integers(0, M, size=(5, 6))
    hi = np.minimum(M, lo + rng.integers(0, 40, size=(5, 6)))
    lo[0, 0], hi[0, 0] = 0, M  # every token with bytes
    lo[1, 1] = hi[1, 1] = 3  # empty
    rows = torch.tensor([3, 0, 3, 1, 2])
    out, lse = reference.range_logmass(x, V, order, rows, torch.from_numpy(lo).int(), torch.from_numpy(hi).int())
    p = probs64(x, V)
    want = np.array([[p[r, order[a:b].numpy()].sum() for a, b in zip(lo[q], hi[q])] for q, r in enumerate(rows.tolist())])
    assert_close(out, logs(want))
    assert out[1, 1].item() == NEG_INF
    shared, _ = reference.range_logmass(x, V, order, None, torch.from_numpy(lo[:1]).int(), torch.from_numpy(hi[:1]).int())
    assert shared.shape == (4, 6)
    want_shared = np.array([[p[r, order[a:b].numpy()].sum() for a, b in zip(lo[0], hi[0])] for r in range(4)])
    assert_close(shared, logs(want_shared))


def test_small_ranges_keep_relative_precision(load_test_vocab):
    """One token holds almost all the mass: range masses of e^-60 cannot come from prefix-sum
    differences (they cancel), the direct-sum rule recovers them."""
    vocab = load_test_vocab("mistral-v1")
    _, order, rank, _ = trie_tables(vocab)
    V = len(vocab)
    x = torch.zeros(1, V, dtype=torch.float64)
    x[0, order[len(order) // 2]] = 60.0
    lo = torch.tensor([[10, 100, 20000, len(order) // 2]], dtype=torch.int32)
    hi = torch.tensor([[12, 160, 20003, len(order) // 2 + 1]], dtype=torch.int32)
    out, _ = reference.range_logmass(x, V, order, None, lo, hi)
    p = probs64(x, V)
    want = np.array([[p[0, order[a:b].numpy()].sum() for a, b in zip(lo[0].tolist(), hi[0].tolist())]])
    assert_close(out, logs(want), tol=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_rows(vocab, temperature):
    group, order, rank, _ = trie_tables(vocab)
    V, M = len(vocab), len(order)
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(2)) * 3
    top = torch.topk(torch.log_softmax(x, -1), 40, dim=-1)
    idx, lp = top.indices, top.values
    out = reference.topk_grouped_logmass(idx, lp, group, 257, temperature)
    lp64 = lp.double().numpy()
    if temperature != 1.0:  # kept entries reshaped at temperature T, their total mass kept
        z = lp64 / temperature
        z = z - np.log(np.exp(z).sum(1, keepdims=True)) + np.log(np.exp(lp64).sum(1, keepdims=True))
        lp64 = z
    want = np.zeros((3, 257))
    for r in range(3):
        for j, t in enumerate(idx[r].tolist()):
            want[r, group[t]] += np.exp(lp64[r, j])
    assert_close(out, logs(want))
    lo = torch.tensor([[0, 5, 100], [M // 3, M // 2, 0]], dtype=torch.int32)
    hi = torch.tensor([[M, 900, 100], [M // 2, M, M // 3]], dtype=torch.int32)
    rows = torch.tensor([2, 0])
    ranged = reference.topk_range_logmass(idx, lp, rank, M, rows, lo, hi, temperature)
    want_r = np.zeros((2, 3))
    for q, r in enumerate(rows.tolist()):
        for c in range(3):
            for j, t in enumerate(idx[r].tolist()):
                if lo[q, c] <= rank[t] < hi[q, c]:
                    want_r[q, c] += np.exp(lp64[r, j])
    assert_close(ranged, logs(want_r))


def test_tempered_logprobs():
    lp = torch.log_softmax(torch.randn(2, 30, dtype=torch.float64), -1)
    assert torch.equal(reference.tempered_logprobs(lp, 1.0), lp)
    assert torch.allclose(reference.tempered_logprobs(lp, 0.5), torch.log_softmax(lp / 0.5, -1))  # k covers V
    part = lp[:, :10]
    hot = reference.tempered_logprobs(part, 3.0)
    assert torch.allclose(torch.logsumexp(hot, -1), torch.logsumexp(part, -1))
    empty = torch.full((1, 4), NEG_INF, dtype=torch.float64)
    assert torch.isneginf(reference.tempered_logprobs(empty, 2.0)).all()


def test_gradients_have_no_nan_at_zero_mass(vocab):
    group, _, _, _ = trie_tables(vocab)
    V = len(vocab)
    x = torch.randn(2, V, dtype=torch.float64, requires_grad=True)
    out, _ = reference.grouped_logmass(x, V, group, 258)
    assert torch.isneginf(out[:, 257]).all()  # an empty group
    out.masked_fill(torch.isinf(out), 0).sum().backward()
    assert torch.isfinite(x.grad).all()
    m = torch.tensor([0.0, 0.5], requires_grad=True)
    reference.safe_log(m).masked_fill(torch.tensor([True, False]), 0).sum().backward()
    assert torch.equal(m.grad, torch.tensor([0.0, 2.0]))


def test_float32_accumulation_is_close(vocab):
    group, order, _, _ = trie_tables(vocab)
    V = len(vocab)
    x = torch.randn(2, V) * 2
    exact, _ = reference.grouped_logmass(x, V, group, 257)
    fast, _ = reference.grouped_logmass(x, V, group, 257, accumulate=torch.float32)
    finite = torch.isfinite(exact)
    assert torch.equal(finite, torch.isfinite(fast))
    assert (exact[finite] - fast[finite]).abs().max() < 1e-4
