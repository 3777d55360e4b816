"""dec_S from raw bytes, never normalised (issue #15): Qwen's NFC made 189 dec_S sequences shared
by two teacher tokens (`;` and U+037E, `K` and U+212A, CJK compatibility ideographs) when the
student (Qwen shrunk with ``shrink-vocab``, which keeps the NFC normalizer) tokenized each teacher
token's bytes through its normalizer. The telescoping sum then counted the twin's mass (log 2 off
for equal logits), and the map still said ``subset``."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch


@pytest.fixture(scope="module")
def qwen_map(tmp_path_factory, load_test_vocab):
    from ctalign import build_map
    from ctalign.shrink import shrink_vocab
    from ctalign.vocab import load_vocab
    qwen = load_test_vocab("qwen")
    out = tmp_path_factory.mktemp("shrunk-qwen")
    shrink_vocab(qwen, 3000, out)
    student = load_vocab(out, name="qwen-shrunk")
    return qwen, student, build_map(qwen, student)


def test_no_two_teacher_tokens_share_a_dec_sequence(qwen_map):
    qwen, _, amap = qwen_map
    groups = defaultdict(set)
    for t in range(len(qwen)):
        b = qwen.token_bytes(t)
        if b is not None:
            groups[tuple(amap.dec(t))].add(b)
    shared = {k: v for k, v in groups.items() if len(v) > 1}
    assert not shared, f"{len(shared)} dec_S sequences stand for several byte strings, e.g. {list(shared.values())[:3]}"


def test_dec_spells_the_raw_bytes(qwen_map):
    qwen, student, amap = qwen_map
    semi = qwen.ids_of_bytes("\u037e".encode())[0]
    assert student.decode_bytes(amap.dec(semi)) == "\u037e".encode()
    assert amap.report()["dec"]["bytes_mismatch"] == 0


def test_telescoping_of_a_twin_is_its_own_probability(qwen_map):
    """Text `;` after a boundary: the student's targets inside the teacher token `;` telescope to
    log p(`;`), not log(p(`;`) + p(U+037E))."""
    from ctalign import ops
    qwen, student, amap = qwen_map
    semi = qwen.ids_of_bytes(b";")[0]
    twin = qwen.ids_of_bytes("\u037e".encode())[0]
    logits = torch.zeros(1, len(qwen), dtype=torch.float64)
    logits[0, semi] = logits[0, twin] = 5.0
    logp = torch.log_softmax(logits, -1)[0, semi].item()
    dec = amap.dec(semi)
    assert len(dec) == 1
    proj = ops.project_to_student(logits.float(), amap)  # [1, V_s + 1]
    node = amap.dec_trie.lookup(dec)
    within = ops.project_to_student_within(logits.float(), amap, torch.tensor([0]), torch.tensor([node]))
    total = proj[0, dec[0]].item() + within[0, -1].item()  # first piece, then `end`
    assert total == pytest.approx(logp, abs=1e-4), (total, logp, math.log(2))
    assert amap.regime in ("subset", "general")


def test_map_is_subset_with_distinct_twins(qwen_map):
    """With dec_S from raw bytes the subset claim holds: every student token is a teacher token and
    dec_S unrolls the teacher's merge tree (the tokens the teacher's NFC never emits are counted)."""
    _, _, amap = qwen_map
    sc = amap.report()["subset_check"]
    assert amap.regime == "subset" and sc["teacher_tokens_unroll_mismatch"] == 0
