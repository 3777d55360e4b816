"""The short fuzz run of CI (issue #21): a few hundred mutated inputs per format, each in a worker
process under memory and time limits; no crash, hang, unclear error or silent wrong result.
The long run (10,000+ per format) is documented in tests/fuzz/README.md."""
from __future__ import annotations

import json

from tests.fuzz.campaign import BAD, FORMATS, campaign

CI_TRIALS = 300  # per format: ~15-30 s in all on 2 cores
CI_SEED = 2026
# every format, ops_extreme included (spreads of 1e6-1e30 after the temperature, #21: finite since the
# kernels split large shifts, cpp/kernels/common.h, Shift)
CI_FORMATS = list(FORMATS)


def test_short_fuzz_campaign_finds_nothing_bad():
    res = campaign(CI_FORMATS, CI_TRIALS, CI_SEED, jobs=2)
    bad = {f: {o: res["counts"][f][o] for o in BAD if res["counts"][f][o]} for f in CI_FORMATS}
    bad = {f: c for f, c in bad.items() if c}
    assert not bad, json.dumps({"bad": bad, "examples": res["bad_examples"]}, indent=1)
    for f in CI_FORMATS:
        assert sum(res["counts"][f].values()) == CI_TRIALS
