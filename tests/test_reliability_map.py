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
from ctalign.prefix_groups import PG_FIELDS

DERIVED = (["identical", "cover_lo", "cover_hi", "first_student"]
           + [f"{trie}.{f}" for trie in ("teacher_trie", "dec_trie") for f in TRIE_FIELDS]
           + [f"{table}.{f}" for table in ("teacher_table", "student_table") for f in TABLE_FIELDS]
           + [f"prefix_groups.{f}" for f in PG_FIELDS])


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
    named = name if name.startswith("prefix_groups.") else name.split(".")[0]  # the prefix groups: the array itself
    assert named in str(e.value), str(e.value)


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


def test_forged_shorter_prefix_group_is_refused(genuine, tmp_path):
    """A teacher token regrouped to a shorter student prefix, with prefix_len, strict, the child range
    and student_group made to match (each array self-consistent): the longest-prefix check tells."""
    from ctalign.prefix_groups import prefix_groups
    m, _ = genuine
    pg = prefix_groups(m)
    t_bytes = m.teacher.all_token_bytes()
    s_rep: dict[bytes, int] = {}
    for i, b in enumerate(m.student.all_token_bytes()):
        if b:
            s_rep.setdefault(b, i)
    Vs = m.n_student
    for t in np.flatnonzero(pg.group < Vs):
        b, L = t_bytes[t], int(pg.prefix_len[t])
        shorter = [k for k in range(1, L) if b[:k] in s_rep]
        if shorter:
            k = shorter[-1]
            break
    else:
        pytest.skip("no teacher token with two student prefixes")
    group, plen, strict = pg.group.copy(), pg.prefix_len.copy(), pg.strict.astype(np.uint8)
    group[t], plen[t], strict[t] = s_rep[b[:k]], k, 1
    used = np.zeros(Vs + 1, dtype=bool)
    used[group] = True
    used[Vs] = False
    student_group = np.where(used[pg.rep], pg.rep, Vs).astype(np.int32)
    path = _forge(m, tmp_path, **{"prefix_groups.group": group, "prefix_groups.prefix_len": plen,
                                  "prefix_groups.strict": strict, "prefix_groups.student_group": student_group})
    with pytest.raises(ArtifactError, match="longer student prefix"):
        AlignmentMap.load(path)


def test_missing_prefix_group_array_is_refused(genuine, tmp_path):
    m, _ = genuine
    a = m.arrays()
    del a["prefix_groups.child_hi"]
    path = tmp_path / "partial.ctmap"
    path.write_bytes(_encode_artifact(m._header, a))
    with pytest.raises(ArtifactError, match="no array 'prefix_groups.child_hi'"):
        AlignmentMap.load(path)
