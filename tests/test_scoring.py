"""The lossless scorer (ctalign.scoring) against brute-force enumeration of covers (tests/_covers.py),
float64, a deterministic hash teacher: the general regime (gpt2 -> mistral-v1, byte covers) and the
subset regime (gpt2 -> its shrink-vocab student, covers in student ids through dec_S)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _covers import HashTeacher, Units, covers, next_unit, prefix_mass  # noqa: E402
from test_losses import get_map  # noqa: E402

from ctalign.scoring import fast_logprobs, lossless_logprobs  # noqa: E402


class CountingTeacher(HashTeacher):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls, self.rows = 0, 0

    def __call__(self, sequences):
        self.calls += 1
        self.rows += len(sequences)
        return super().__call__(sequences)


@pytest.mark.parametrize("text", ["the cat", "ab, 12"])
def test_lossless_scorer_equals_bruteforce_in_the_general_regime(text):
    amap = get_map("gpt2", "mistral-v1")
    assert amap.regime == "general"
    tv = amap.teacher
    fn = CountingTeacher(len(tv) + 2, scale=1.5, salt=7)
    res = lossless_logprobs(fn, amap, text, batch_size=16)
    assert res.units == "bytes"
    x = tuple(text.encode())
    units = Units.bytes_of(tv)
    cov = covers(units, x, len(x), fn, (), len(tv))
    s_ids = amap.student.encode(text)
    from ctalign.align import token_spans
    ends = token_spans(amap.student, [s_ids], None, [text])[1][0].tolist()
    want = [np.log(prefix_mass(units, x, e, fn, (), len(tv), cov)) for e in ends]
    assert np.allclose(res.prefix_logprob[1:], want, rtol=1e-9, atol=1e-9), (res.prefix_logprob[1:], want)
    assert res.prefixes == res.teacher_rows == fn.rows - 0 and fn.calls < fn.rows  # batched
    assert abs(res.total - want[-1]) < 1e-9 and res.nats_per_byte > 0


def test_lossless_scorer_equals_the_unrestricted_marginal_in_the_subset_regime():
    """units='student': P(s_j | s_<j) = the next-student-token distribution over every cover, by brute
    force, at each token; the exact targets account for part of those covers only."""
    amap = get_map("gpt2", "gpt2-shrunk")
    assert amap.regime == "subset"
    tv = amap.teacher
    fn = HashTeacher(len(tv) + 2, scale=1.5, salt=9)
    text = "the bigger"
    res = lossless_logprobs(fn, amap, text)
    assert res.units == "student"
    x = tuple(amap.student.encode(text))
    units = Units.student(amap)
    for m in range(len(x)):
        q = next_unit(units, x, m, fn, (), len(tv), covers(units, x, m, fn, (), len(tv)))
        assert abs(np.log(q[x[m]] / q.sum()) - res.logprobs[m]) < 1e-9, m
    fast = fast_logprobs(fn, amap, text, targets="exact")
    assert fast.extra["exact"][-1]  # (gpt2 has no bos: the first teacher token has no row, nor its successor an exact target)
    assert np.isfinite(fast.logprobs[1:]).all() and not np.allclose(fast.logprobs[1:], res.logprobs[1:])


def test_prune_drops_prefixes_and_says_so():
    amap = get_map("gpt2", "mistral-v1")
    fn = HashTeacher(len(amap.teacher) + 2, scale=1.5, salt=7)
    full = lossless_logprobs(fn, amap, "the cat")
    pruned = lossless_logprobs(fn, amap, "the cat", prune=2.0)
    assert pruned.pruned > 0 and pruned.prefixes < full.prefixes
    assert pruned.total <= full.total + 1e-12
    with pytest.raises(ValueError, match="units='student' needs the subset"):
        lossless_logprobs(fn, amap, "x", units="student")
