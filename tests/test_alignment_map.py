"""The teacher -> student map on real tokenizer pairs across families, against brute-force
definitions (docs/design.md: cover, dec_S, first_student, regimes), and the saved artifact."""
from __future__ import annotations

import hashlib
import json
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctalign.alignment_map import AlignmentMap, build_map
from ctalign.artifact import FORMAT_VERSION, MAGIC, _decode_artifact, _encode_artifact
from ctalign.errors import ArtifactError, CtalignError, MapMismatchError

# teacher, student, expected regime: SentencePiece <-> byte-level BPE, tiktoken <-> byte-level BPE,
# tiktoken -> WordPiece, WordPiece -> tiktoken, Unigram -> Unigram, and a self map.
PAIRS = [
    ("mistral-v1", "llama3", "general"),
    ("llama3", "mistral-v1", "general"),
    ("gpt2-tiktoken", "llama3", "general"),
    ("qwen", "bert-uncased", "general"),
    ("bert-uncased", "qwen", "general"),
    ("botchan-unigram", "kyoto-unigram", "general"),
    ("mistral-v1", "mistral-v1", "identical"),
]
SAMPLES = 30


@pytest.fixture(scope="module")
def get_map(load_test_vocab):
    cache: dict = {}

    def get(teacher: str, student: str) -> AlignmentMap:
        if (teacher, student) not in cache:
            cache[teacher, student] = build_map(load_test_vocab(teacher), load_test_vocab(student))
        return cache[teacher, student]
    return get


def _sample(ids, k: int, seed: int) -> list[int]:
    ids = list(ids)
    return sorted(random.Random(seed).sample(ids, min(k, len(ids))))


@pytest.mark.parametrize("teacher,student,regime", PAIRS)
def test_regime_and_sizes(get_map, teacher, student, regime):
    m = get_map(teacher, student)
    T, S = m.teacher, m.student
    assert m.regime == regime
    assert (m.n_teacher, m.n_student) == (len(T), len(S))
    assert m.cover_lo.shape == m.cover_hi.shape == (len(S),)
    assert m.first_student.shape == (len(T),) and m.dec_offsets.shape == (len(T) + 1,)
    assert m.teacher_fingerprint == T.fingerprint and m.student_fingerprint == S.fingerprint
    for a in (m.identical, m.cover_lo, m.dec_ids, m.first_student):
        assert not a.flags.writeable
    rep = m.report()
    json.dumps(rep)  # JSON-ready
    assert rep["regime"] == regime and rep["teacher"]["kind"] == T.kind and rep["student"]["kind"] == S.kind
    assert set(rep["timings"]) >= {"parse_s", "build_s", "encode_raw_s", "core_s"}


@pytest.mark.parametrize("teacher,student,regime", PAIRS)
def test_identical_pairs_brute_force(get_map, teacher, student, regime):
    m = get_map(teacher, student)
    T, S = m.teacher, m.student
    by_bytes: dict[bytes, list[int]] = {}
    for s in range(len(S)):
        b = S.token_bytes(s)
        if b is not None:
            by_bytes.setdefault(b, []).append(s)
    expected = [(t, s) for t in range(len(T)) if T.token_bytes(t) is not None
                for s in by_bytes.get(T.token_bytes(t), ())]
    assert m.identical.tolist() == [list(p) for p in expected]
    rep = m.report()
    n_teacher = len({t for t, _ in expected})
    assert rep["identical_share"]["teacher"] == pytest.approx(n_teacher / rep["teacher"]["with_bytes"], abs=1e-6)


@pytest.mark.parametrize("teacher,student,regime", PAIRS)
def test_cover_against_brute_force(get_map, teacher, student, regime):
    m = get_map(teacher, student)
    T, S = m.teacher, m.student
    teacher_bytes = [(t, T.token_bytes(t)) for t in range(len(T)) if T.token_bytes(t) is not None]
    order = m.teacher_order
    with_bytes = [s for s in range(len(S)) if S.token_bytes(s) is not None]
    picked = _sample(with_bytes, SAMPLES, seed=1) + [min(S.specials)] if S.specials else _sample(with_bytes, SAMPLES, 1)
    # single-byte / short student tokens cover the most teacher tokens: include a few
    picked += sorted(with_bytes, key=lambda s: len(S.token_bytes(s)))[:5]
    for s in picked:
        b = S.token_bytes(s)
        lo, hi = int(m.cover_lo[s]), int(m.cover_hi[s])
        if b is None:
            assert lo == hi, f"special student token {s} has a cover"
            continue
        expected = sorted(t for t, tb in teacher_bytes if tb.startswith(b))
        assert sorted(order[lo:hi].tolist()) == expected, f"cover of student token {s} {b!r}"
    uncovered = sum(1 for s in with_bytes if m.cover_lo[s] == m.cover_hi[s])
    assert m.report()["uncovered_student_tokens"] == uncovered


@pytest.mark.parametrize("teacher,student,regime", PAIRS)
def test_dec_is_the_students_own_encoding(get_map, teacher, student, regime):
    m = get_map(teacher, student)
    T, S = m.teacher, m.student
    with_bytes = [t for t in range(len(T)) if T.token_bytes(t) is not None]
    picked = _sample(with_bytes, SAMPLES, seed=2)
    # one by one through the student's own library encoder (not the compiled fast path that built the
    # map), and whole texts through encode() when that adds nothing around them
    assert [m.dec(t) for t in picked] == [S.encode_raw([T.token_bytes(t)], fast=False)[0] for t in picked]
    if not S.prefix_space and S.normalizer is None:
        for t in picked:
            try:
                text = T.token_bytes(t).decode("utf-8")
            except UnicodeDecodeError:
                continue
            assert m.dec(t) == S.encode(text), f"teacher token {t} {text!r}"
    for t in T.specials:
        assert m.dec(t) == []
    # byte consistency is reported exactly
    mismatch = sum(1 for t in with_bytes if S.decode_bytes(m.dec(t)) != T.token_bytes(t))
    assert m.report()["dec"]["bytes_mismatch"] == mismatch


@pytest.mark.parametrize("teacher,student,regime", PAIRS)
def test_first_student_and_dec_trie(get_map, teacher, student, regime):
    m = get_map(teacher, student)
    T, S = m.teacher, m.student
    Vs = len(S)
    fs = m.first_student.tolist()
    offsets, ids = m.dec_offsets.tolist(), m.dec_ids.tolist()
    seqs = {t: tuple(ids[offsets[t]:offsets[t + 1]]) for t in range(len(T)) if offsets[t + 1] > offsets[t]}
    for t in range(len(T)):
        if t in T.specials:
            role = T.specials[t]
            if role in ("bos", "eos", "pad", "unk") and role in S.special_ids:
                assert fs[t] == S.special_ids[role], f"teacher {role} {t}"
            elif role == "other" and T.special_text[t] in S.special_text.values():
                assert S.special_text[fs[t]] == T.special_text[t]
            else:
                assert fs[t] == Vs
        else:
            assert fs[t] == (seqs[t][0] if t in seqs else Vs)
    # dec trie: teacher ids sorted by dec_S, every student-token prefix owns a range
    trie = m.dec_trie
    assert trie.n_symbols == max(Vs, 1)
    assert sorted(seqs, key=lambda t: (seqs[t], t)) == trie.order.tolist()
    for t in _sample(seqs, 10, seed=3):
        for depth in (1, 2):
            prefix = seqs[t][:depth]
            node = trie.lookup(np.asarray(prefix, dtype=np.int32))
            members = trie.order[trie.node_lo[node]:trie.node_hi[node]].tolist()
            assert sorted(members) == sorted(u for u, s in seqs.items() if s[:len(prefix)] == prefix)


def test_identical_regime_self_map(get_map):
    m = get_map("mistral-v1", "mistral-v1")
    T = m.teacher
    pairs = {tuple(p) for p in m.identical.tolist()}
    for t in range(len(T)):
        if T.token_bytes(t) is not None:
            assert (t, t) in pairs
        else:
            assert m.first_student[t] == t  # every special maps to itself
    assert "subset_check" not in m.report()


def test_general_regime_reports_mismatch_counts(get_map):
    rep = get_map("llama3", "mistral-v1").report()
    sc = rep["subset_check"]
    assert sc["student_tokens_not_in_teacher"] > 0 and sc["teacher_tokens_unroll_mismatch"] > 0
    assert any("prefix space" in w for w in rep["warnings"])
    rep = get_map("qwen", "bert-uncased").report()
    assert rep["subset_check"]["teacher_tokens_unroll_mismatch"] > 0
    assert any("lossily" in w for w in rep["warnings"])
    assert rep["dec"]["empty"] > 0  # whitespace tokens: WordPiece drops them
    assert any("empty dec_S" in w for w in rep["warnings"])


def test_no_dense_matrix(get_map):
    m = get_map("gpt2-tiktoken", "llama3")
    total = sum(a.nbytes for a in m.arrays().values())
    assert total < 8 * (m.n_teacher + m.n_student) * 40  # O(V) tables, nothing V_t x V_s


# ---- artifact ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(get_map, tmp_path_factory):
    m = get_map("mistral-v1", "llama3")
    path = tmp_path_factory.mktemp("maps") / "pair.ctmap"
    m.save(path)
    return m, path


def test_round_trip(saved, load_test_vocab):
    m, path = saved
    loaded = AlignmentMap.load(path)
    assert loaded.teacher is None and loaded.student is None
    assert loaded.regime == m.regime and loaded.n_teacher == m.n_teacher and loaded.n_student == m.n_student
    assert set(loaded.arrays()) == set(m.arrays())
    for name, a in m.arrays().items():
        b = loaded.arrays()[name]
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    assert loaded.teacher_specials == m.teacher_specials and loaded.student_special_ids == m.student_special_ids
    rep_a, rep_b = m.report(), loaded.report()
    for r in (rep_a, rep_b):
        r.pop("timings"), r.pop("path", None)
    assert rep_a == rep_b
    # the tries rebuilt from the stored tables work without the tokenizer files
    trie = loaded.teacher_trie
    b = m.teacher.token_bytes(1000)
    node = trie.lookup(np.frombuffer(b, dtype=np.uint8))
    assert 1000 in trie.order[trie.node_lo[node]:trie.node_end[node]].tolist()
    assert np.array_equal(loaded.dec_trie.order, m.dec_trie.order)
    assert loaded.teacher_table.fingerprint == m.teacher_fingerprint
    assert loaded.student_table.fingerprint == m.student_fingerprint
    # with the right tokenizers: verified and attached
    again = AlignmentMap.load(path, load_test_vocab("mistral-v1"), load_test_vocab("llama3"))
    assert again.teacher is load_test_vocab("mistral-v1") and again.student is load_test_vocab("llama3")


def test_deterministic(load_test_vocab, saved, tmp_path):
    m, path = saved
    again = build_map(load_test_vocab("mistral-v1"), load_test_vocab("llama3"))
    again.save(tmp_path / "b.ctmap")
    assert (tmp_path / "b.ctmap").read_bytes() == path.read_bytes()
    assert again.to_bytes() == m.to_bytes()


def test_fingerprint_mismatch(saved, load_test_vocab):
    _, path = saved
    with pytest.raises(MapMismatchError, match="teacher 'mistral-v1'.*given teacher 'mistral-v3'"):
        AlignmentMap.load(path, teacher=load_test_vocab("mistral-v3"))
    with pytest.raises(MapMismatchError, match="student 'llama3'.*given student 'deepseek-v3'"):
        AlignmentMap.load(path, load_test_vocab("mistral-v1"), load_test_vocab("deepseek-v3"))
    loaded = AlignmentMap.load(path)
    with pytest.raises(MapMismatchError, match="student"):
        loaded.verify(student=load_test_vocab("mistral-v1"))
    assert issubclass(MapMismatchError, CtalignError) and issubclass(CtalignError, ValueError)


def test_atomic_save_leaves_no_temporary(saved, tmp_path):
    m, _ = saved
    target = tmp_path / "x.ctmap"
    target.write_bytes(b"old")
    m.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.ctmap"]
    assert AlignmentMap.load(target).regime == m.regime
    with pytest.raises(ArtifactError, match="does not exist"):
        m.save(tmp_path / "missing" / "x.ctmap")


@pytest.mark.parametrize("cut", [0, 5, 8, 20, 40, 1000, "half", -33, -1])
def test_truncated(saved, tmp_path, cut):
    _, path = saved
    data = path.read_bytes()
    n = len(data) // 2 if cut == "half" else (cut if cut >= 0 else len(data) + cut)
    bad = tmp_path / "cut.ctmap"
    bad.write_bytes(data[:n])
    with pytest.raises(ArtifactError) as e:
        AlignmentMap.load(bad)
    msg = str(e.value)
    assert str(bad) in msg
    assert "truncated" in msg or "corrupt" in msg or "checksum" in msg


def test_corrupted_byte(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    for pos in (len(data) // 3, len(data) - 40):
        bad_data = bytearray(data)
        bad_data[pos] ^= 0x40
        bad = tmp_path / "flip.ctmap"
        bad.write_bytes(bytes(bad_data))
        with pytest.raises(ArtifactError, match="checksum mismatch"):
            AlignmentMap.load(bad)


def test_wrong_magic_and_version(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.ctmap"
    bad.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ArtifactError, match="not a ctalign alignment map"):
        AlignmentMap.load(bad)
    bad.write_bytes(data[:8] + struct.pack("<I", FORMAT_VERSION + 1) + data[12:])
    with pytest.raises(ArtifactError, match=f"unsupported format version {FORMAT_VERSION + 1}"):
        AlignmentMap.load(bad)
    bad.write_bytes(b"CTALMAP2" + data[8:])
    with pytest.raises(ArtifactError, match="generation"):
        AlignmentMap.load(bad)
    with pytest.raises(ArtifactError, match="no such file"):
        AlignmentMap.load(tmp_path / "nothing.ctmap")
    with pytest.raises(ArtifactError, match="directory"):
        AlignmentMap.load(tmp_path)


def test_consistent_checksum_but_inconsistent_tables(saved, tmp_path):
    m, _ = saved
    arrays = m.arrays()
    ids = arrays["dec_ids"].copy()
    ids[0] = m.n_student + 5
    arrays["dec_ids"] = ids
    bad = tmp_path / "forged.ctmap"
    bad.write_bytes(_encode_artifact(m._header, arrays))
    with pytest.raises(ArtifactError, match="dec_ids hold student ids out of range"):
        AlignmentMap.load(bad)
    arrays = m.arrays()
    del arrays["cover_lo"]
    bad.write_bytes(_encode_artifact(m._header, arrays))
    with pytest.raises(ArtifactError, match="no array 'cover_lo'"):
        AlignmentMap.load(bad)


@pytest.mark.parametrize("trie, field, value, problem", [
    ("teacher_trie", "child_node", 10**6, "child_node holds node ids out of range"),
    ("dec_trie", "child_node", -3, "child_node holds node ids out of range"),
    ("teacher_trie", "node_hi", 10**8, "node ranges lie outside the order"),
    ("dec_trie", "order", -1, "order holds ids out of range"),
])
def test_forged_trie_arrays_are_refused_before_any_kernel_reads_them(saved, tmp_path, trie, field, value, problem):
    m, _ = saved
    arrays = m.arrays()
    a = arrays[f"{trie}.{field}"].copy()
    a[-1] = value
    arrays[f"{trie}.{field}"] = a
    bad = tmp_path / "forged.ctmap"
    bad.write_bytes(_encode_artifact(m._header, arrays))
    with pytest.raises(ArtifactError, match=f"{trie}: {problem}"):
        AlignmentMap.load(bad)


def test_version_1_map_is_refused_with_a_rebuild_message(saved, tmp_path):
    """A map written before the prefix-group arrays (format version 1: the same container without
    ``prefix_groups.*``) gets one clear ArtifactError naming the command that rebuilds it."""
    m, _ = saved
    old = {k: v for k, v in m.arrays().items() if not k.startswith("prefix_groups.")}
    path = tmp_path / "v1.ctmap"
    path.write_bytes(_encode_artifact(m._header, old, version=1))
    assert struct.unpack_from("<I", path.read_bytes(), 8)[0] == 1
    with pytest.raises(ArtifactError) as e:
        AlignmentMap.load(path)
    msg = str(e.value)
    assert str(path) in msg and "format version 1" in msg and f"reads version {FORMAT_VERSION}" in msg
    assert "rebuild the map with `ctalign build-map" in msg


def test_prefix_groups_are_map_arrays(saved, monkeypatch):
    """build_map stores the prefix groups; a loaded map reads them (no recomputation) and they equal
    the ones computed from the map's tables."""
    import ctalign.prefix_groups as P
    m, path = saved
    assert FORMAT_VERSION == 2
    assert {f"prefix_groups.{f}" for f in P.PG_FIELDS} <= set(m.arrays())
    assert "prefix_groups_s" in m.report()["timings"]
    want = P._compute(m)
    monkeypatch.setattr(P, "_compute", lambda amap: pytest.fail("a loaded map recomputed its prefix groups"))
    m.__dict__.pop("_ctalign_prefix_groups", None)  # drop what the loss tests may have cached
    for amap in (m, AlignmentMap.load(path)):
        pg = P.prefix_groups(amap)
        assert P.prefix_groups(amap) is pg and pg.strict.dtype == bool
        for f in P.PG_FIELDS:
            assert np.array_equal(getattr(pg, f), getattr(want, f)), f


def test_layout(saved):
    _, path = saved
    data = path.read_bytes()
    assert data[:8] == MAGIC
    assert struct.unpack_from("<I", data, 8)[0] == FORMAT_VERSION
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    header, arrays = _decode_artifact(data, "x")
    assert header["teacher"]["name"] == "mistral-v1" and header["regime"] == "general"
    _, _, _, hlen, dlen = struct.unpack_from("<8sIIQQ", data, 0)
    for name, code, shape, offset, nbytes in json.loads(data[32 + hlen:32 + hlen + dlen]):
        assert offset % 64 == 0, name
    assert "source" not in json.dumps(header)  # no paths: artifacts do not depend on where files live


_arrays = st.dictionaries(
    st.text("abcdefgh._", min_size=1, max_size=12),
    st.one_of(
        st.lists(st.integers(-2**31, 2**31 - 1), max_size=50).map(lambda x: np.asarray(x, dtype=np.int32)),
        st.lists(st.integers(-2**63, 2**63 - 1), max_size=20).map(lambda x: np.asarray(x, dtype=np.int64)),
        st.binary(max_size=70).map(lambda b: np.frombuffer(b, dtype=np.uint8))),
    max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=_arrays, header=st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
       flip=st.integers(0, 10**9))
def test_container_round_trip_and_any_flip(arrays, header, flip):
    data = _encode_artifact(header, arrays)
    h, back = _decode_artifact(data, "mem")
    assert {k: v for k, v in h.items() if k != "version"} == header
    assert set(back) == set(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and np.array_equal(back[k], a)
    assert _encode_artifact(header, arrays) == data
    bad = bytearray(data)
    bad[flip % len(bad)] ^= 1 << (flip % 8)
    with pytest.raises(ArtifactError):
        _decode_artifact(bytes(bad), "mem")


def test_header_without_report_fields_is_an_artifact_error(saved, tmp_path):
    m, _ = saved
    header = json.loads(json.dumps(m._header))
    header["stats"] = {"dec_total": header["stats"]["dec_total"]}  # the rest of the statistics dropped
    bad = tmp_path / "partial-header.ctmap"
    bad.write_bytes(_encode_artifact(header, m.arrays()))
    with pytest.raises(ArtifactError, match="inconsistent header"):
        AlignmentMap.load(bad)
