"""Maps are untrusted input (issue #21): a map whose derived arrays were changed and whose checksum
was recomputed is refused on load with an ArtifactError naming the array, for every derived array;
so are forged header fields (regime, statistics, specials, fingerprints)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctalign.alignment_map import TABLE_FIELDS, TRIE_FIELDS, AlignmentMap, build_map
from ctalign.artifact import _encode_artifact
from ctalign.errors import ArtifactError, MapMismatchError

DERIVED = (["identical", "cover_lo", "cover_hi", "first_student"]
           + [f"{trie}.{f}" for trie in ("teacher_trie", "dec_trie") for f in TRIE_FIELDS]
           + [f"{table}.{f}" for table in ("teacher_table", "student_table") for f in TABLE_FIELDS])


@pytest.fixture(scope="module")
def genuine(load_test_vocab, tmp_path_factory):
    m = build_map(load_test_vocab("botchan-bpe"), load_test_vocab("botchan-unigram"))
    path = tmp_path_factory.mktemp("maps") / "genuine.ctmap"
    m.save(path)
    return m, path


def _swap_two(a: np.ndarray) -> np.ndarray:
    """The array with two different values exchanged (every value stays one the array holds, so
    range checks alone cannot tell)."""
    flat = a.copy().reshape(-1)
    if a.ndim == 2:  # identical pairs: exchange two student ids
        col = a[:, 1].copy()
        j = int(np.flatnonzero(col != col[0])[0])
        col[0], col[j] = col[j], col[0]
        out = a.copy()
        out[:, 1] = col
        return out
    i = len(flat) // 2
    diff = np.flatnonzero(flat != flat[i])
    j = int(diff[np.argmin(np.abs(diff - i))])
    flat[i], flat[j] = flat[j], flat[i]
    return flat.reshape(a.shape)


def _forge(m, tmp_path, header=None, **arrays):
    a = m.arrays()
    a.update(arrays)
    path = tmp_path / "forged.ctmap"
    path.write_bytes(_encode_artifact(header if header is not None else m._header, a))  # checksum recomputed
    return path


def test_genuine_map_loads(genuine, load_test_vocab):
    m, path = genuine
    back = AlignmentMap.load(path, load_test_vocab("botchan-bpe"), load_test_vocab("botchan-unigram"))
    for name, a in m.arrays().items():
        assert np.array_equal(back.arrays()[name], a), name


@pytest.mark.parametrize("name", DERIVED)
def test_forged_derived_array_is_refused(genuine, tmp_path, name):
    m, _ = genuine
    path = _forge(m, tmp_path, **{name: _swap_two(m.arrays()[name])})
    with pytest.raises(ArtifactError) as e:
        AlignmentMap.load(path)
    assert name.split(".")[0] in str(e.value), str(e.value)


@pytest.mark.parametrize("edit, problem", [
    (lambda h: h.update(regime="subset"), "regime 'subset'"),
    (lambda h: h.update(regime="identical"), "regime 'identical'"),
    (lambda h: h["stats"].update(uncovered_student=h["stats"]["uncovered_student"] + 1), "stats.uncovered_student"),
    (lambda h: h["stats"].update(dec_bytes_mismatch=0), "stats.dec_bytes_mismatch"),
    (lambda h: h["teacher"].update(fingerprint="0" * 64), "fingerprint"),
    (lambda h: h["student"]["specials"].__setitem__(0, [h["student"]["specials"][0][0], "bos", "x"]), "first_student"),
    (lambda h: h["teacher"]["specials"].append([5, "eos", "x"]), "specials"),
])
def test_forged_header_is_refused(genuine, tmp_path, edit, problem):
    m, _ = genuine
    header = json.loads(json.dumps(m._header))
    edit(header)
    with pytest.raises(ArtifactError, match=problem):
        AlignmentMap.load(_forge(m, tmp_path, header=header))


def test_verify_compares_special_roles(genuine, load_test_vocab, tmp_path):
    """Roles change first_student consistently; the tokenizers' own roles tell the forgery."""
    m, _ = genuine
    header = json.loads(json.dumps(m._header))
    t_roles = header["teacher"]["specials"]
    s_roles = header["student"]["specials"]
    # exchange two teacher roles and the first_student of those specials with them
    (i, ri, ti), (j, rj, tj) = t_roles[0], t_roles[1]
    t_roles[0], t_roles[1] = [i, rj, ti], [j, ri, tj]
    fs = m.first_student.copy()
    fs[i], fs[j] = fs[j], fs[i]
    path = _forge(m, tmp_path, header=header, first_student=fs)
    try:
        amap = AlignmentMap.load(path)
    except ArtifactError:
        return  # refused already
    assert s_roles
    with pytest.raises(MapMismatchError, match="special token roles"):
        amap.verify(load_test_vocab("botchan-bpe"), None)
