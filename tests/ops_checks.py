"""Helpers of the op tests (tests/test_ops.py): logits with padding columns, float64 references and a
log-space comparison that knows the kernels' -inf floor."""
from __future__ import annotations

import numpy as np
import torch

from ctalign import ops

TOL = 1e-5
PAD = 7  # extra logits columns (a padded output layer)


def logits_for(n_rows: int, vocab_size: int, *, scale: float = 3.0, seed: int = 0, pad: int = PAD,
               dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, vocab_size + pad, generator=g) * scale
    x[:, vocab_size:] = float("nan")  # padding columns are never read
    return x.to(dtype)


def log_softmax64(x: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(x[..., :vocab_size].double() / temperature, dim=-1)


FLOOR = -120.0  # kernels count mass below ~e^-151 of a row's top token as zero (float exp range)


def assert_logs_close(got, want, tol=TOL, what=""):
    """Same -inf pattern and |got - want| <= tol + 2e-7 |want| (float32 outputs of large magnitude
    carry their ulp). Values below FLOOR on both sides count as equal (-inf or tiny)."""
    got = torch.as_tensor(np.asarray(got, dtype=np.float64) if not isinstance(got, torch.Tensor) else got).double()
    want = torch.as_tensor(np.asarray(want, dtype=np.float64) if not isinstance(want, torch.Tensor) else want).double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN in output"
    below = (got < FLOOR) & (want < FLOOR)
    inf_got, inf_want = torch.isneginf(got) & ~below, torch.isneginf(want) & ~below
    assert torch.equal(inf_got, inf_want), f"{what}: -inf at different places ({int((inf_got ^ inf_want).sum())})"
    finite = ~inf_got & ~below
    if finite.any():
        err = ((got[finite] - want[finite]).abs() - 2e-7 * want[finite].abs()).max().item()
        assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


def reference_of(fn, *args, **kw):
    with ops.force_backend("reference"):
        out = fn(*args, **kw)
        assert ops.last_backend() == "reference"
    return out


def same_sequence_logprob(x, vocab_size, tokens, ids_with, sequence_of) -> torch.Tensor:
    """log of p(t) summed over the ids whose sequence equals t's (SentencePiece keeps "\u2581" and
    <0x20> both; two teacher tokens may share a dec_S): what the conditionals telescope to."""
    lp = log_softmax64(x, vocab_size)
    return torch.stack([torch.logsumexp(lp[r, ids_with(sequence_of(t))], 0) for r, t in enumerate(tokens)])


def node_prefixes(vocab, tokens) -> list[bytes]:
    """Every proper and full byte prefix of the given tokens (the conditionals' queries)."""
    out = []
    for t in tokens:
        b = vocab.token_bytes(t)
        out += [b[:i] for i in range(1, len(b) + 1)]
    return out
