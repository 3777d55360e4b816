"""TokenTable (cpp/token_table.h): validation, views, exact lookup, fingerprint, sha256."""
from __future__ import annotations

import gc
import hashlib
import pickle
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import core_vocab_files as cv
from ctalign import _core


def fingerprint_reference(tokens) -> str:
    """The definition in docs/ARCHITECTURE.md, written out in Python."""
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(tokens)))
    for t in tokens:
        b = t or b""
        h.update(bytes([t is not None]))
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


@pytest.fixture(scope="session", params=["cl100k", "llama3", "mistral_v1", "gpt2"])
def real(request):
    rv = getattr(cv, request.param)()
    return rv, rv.table()


def test_round_trip_and_views(real):
    rv, table = real
    assert table.size == len(table) == len(rv.tokens)
    assert [table.token_bytes(i) for i in range(table.size)] == rv.tokens
    has = np.array([t is not None for t in rv.tokens], dtype=np.uint8)
    assert np.array_equal(table.has_bytes, has)
    lengths = np.array([len(t or b"") for t in rv.tokens])
    assert np.array_equal(np.diff(table.offsets), lengths)
    assert table.data.tobytes() == b"".join(t or b"" for t in rv.tokens)
    assert table.max_token_length == lengths.max()
    for view in (table.offsets, table.data, table.has_bytes):
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 1


def test_views_keep_table_alive():
    table = _core.TokenTable.from_list([b"ab", None, b"c"])
    offsets, data = table.offsets, table.data
    assert offsets.base is table and data.base is table  # zero-copy: the table owns the memory
    assert offsets.ctypes.data == table.offsets.ctypes.data
    del table
    gc.collect()
    assert offsets.tolist() == [0, 2, 2, 3]
    assert data.tobytes() == b"abc"


def test_constructor_from_arrays_matches_from_list(real):
    rv, table = real
    again = _core.TokenTable(np.array(table.offsets), np.array(table.data), np.array(table.has_bytes).astype(bool))
    assert again.fingerprint == table.fingerprint


def test_fingerprint_matches_definition(real):
    rv, table = real
    assert table.fingerprint == fingerprint_reference(rv.tokens)


def test_fingerprint_stable_and_sensitive():
    tokens = list(cv.gpt2().tokens)
    base = _core.TokenTable.from_list(tokens).fingerprint
    assert _core.TokenTable.from_list(list(tokens)).fingerprint == base
    assert pickle.loads(pickle.dumps(_core.TokenTable.from_list(tokens))).fingerprint == base
    rng = random.Random(0)
    variants = []
    i = rng.randrange(1000, 50000)
    variants.append(tokens[:i] + [tokens[i][:-1] + bytes([tokens[i][-1] ^ 1])] + tokens[i + 1:])  # one bit
    variants.append(tokens[:i] + [tokens[i + 1], tokens[i]] + tokens[i + 2:])  # two ids swapped
    variants.append(tokens[:i] + [None] + tokens[i + 1:])  # a token becomes special
    variants.append(tokens + [None])  # one more (padding-like) id
    variants.append(tokens[:-1])
    # Same concatenated data, different split between two neighbours.
    a, b = tokens[i], tokens[i + 1]
    if len(a) > 1:
        variants.append(tokens[:i] + [a[:-1], a[-1:] + b] + tokens[i + 2:])
    fps = {_core.TokenTable.from_list(v).fingerprint for v in variants}
    assert base not in fps and len(fps) == len(variants)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_sha256_matches_hashlib(data):
    assert _core.sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_sha256_block_boundaries():
    for n in list(range(0, 130)) + [1000, 4096, 100_003]:
        data = bytes((i * 7 + n) & 255 for i in range(n))
        assert _core.sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_lookup_every_token(real):
    rv, table = real
    by_bytes: dict[bytes, list[int]] = {}
    for i, t in enumerate(rv.tokens):
        if t is not None:
            by_bytes.setdefault(t, []).append(i)
    for b, ids in by_bytes.items():
        assert table.lookup(b) == ids
    assert table.lookup(b"") == []
    rng = random.Random(1)
    for _ in range(2000):
        b = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        assert table.lookup(b) == by_bytes.get(b, [])


def test_lookup_duplicates_sentencepiece():
    rv = cv.mistral_v1()
    table = rv.table()
    space_ids = table.lookup(b" ")
    assert len(space_ids) == 2  # the `▁` piece and the <0x20> byte piece
    assert {rv.extra["sp"].id_to_piece(i) for i in space_ids} == {"\u2581", "<0x20>"}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.binary(min_size=1, max_size=6)), max_size=40), st.binary(max_size=6))
def test_lookup_random_tables(tokens, probe):
    table = _core.TokenTable.from_list(tokens)
    assert table.fingerprint == fingerprint_reference(tokens)
    for b in set(t for t in tokens if t is not None) | {probe}:
        assert table.lookup(b) == [i for i, t in enumerate(tokens) if t == b and b]


def arrays(tokens):
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t or b"") for t in tokens])
    data = np.frombuffer(b"".join(t or b"" for t in tokens), dtype=np.uint8).copy()
    has = np.array([t is not None for t in tokens], dtype=np.uint8)
    return offsets, data, has


def test_bad_input_errors():
    o, d, h = arrays([b"ab", None, b"c"])
    _core.TokenTable(o, d, h)
    with pytest.raises(ValueError, match="offsets has 3 entries"):
        _core.TokenTable(o[:-1], d, h)
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        _core.TokenTable(o + 1, np.concatenate([d, d[:1]]), h)
    with pytest.raises(ValueError, match="offsets decrease at id 1"):
        _core.TokenTable(np.array([0, 2, 1, 3], dtype=np.int64), d, h)
    with pytest.raises(ValueError, match="data has 2 bytes"):
        _core.TokenTable(o, d[:2], h)
    with pytest.raises(ValueError, match=r"has_bytes\[0\] = 2"):
        _core.TokenTable(o, d, np.array([2, 0, 1], dtype=np.uint8))
    with pytest.raises(ValueError, match="id 1 has has_bytes = 1 but no bytes"):
        _core.TokenTable(o, d, np.array([1, 1, 1], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"id 0 has has_bytes = 0 \(special\) but 2 bytes"):
        _core.TokenTable(o, d, np.array([0, 0, 1], dtype=np.uint8))
    with pytest.raises(TypeError, match="offsets: expected dtype int64"):
        _core.TokenTable(o.astype(np.int32), d, h)
    with pytest.raises(TypeError, match="data: expected dtype uint8"):
        _core.TokenTable(o, d.astype(np.int16), h)
    with pytest.raises(TypeError, match="has_bytes: expected a numpy array"):
        _core.TokenTable(o, d, [1, 0, 1])
    with pytest.raises(ValueError, match="offsets: expected a 1-d array"):
        _core.TokenTable(o.reshape(1, -1), d, h)
    with pytest.raises(TypeError, match="token 1 is neither bytes nor None"):
        _core.TokenTable.from_list([b"a", "b"])
    table = _core.TokenTable(o, d, h)
    with pytest.raises(ValueError, match=r"id 3 out of range \[0, 3\)"):
        table.token_bytes(3)
    with pytest.raises(ValueError, match="out of range"):
        table.token_bytes(-1)


def test_non_contiguous_input_is_accepted():
    o, d, h = arrays([b"ab", None, b"c"])
    wide = np.zeros(2 * len(d), dtype=np.uint8)
    wide[::2] = d
    assert _core.TokenTable(o, wide[::2], h).fingerprint == fingerprint_reference([b"ab", None, b"c"])


def test_load_vocab_agrees_with_direct_parse():
    """ctalign.load_vocab (python/ctalign/vocab/) gives the same id -> bytes table as these parsers."""
    vocab_mod = pytest.importorskip("ctalign.vocab")
    from ctalign import assets
    specs = {"gpt2": (assets.path("gpt2-encoder"), assets.path("gpt2-merges")), "llama3": assets.path("llama3"),
             "mistral_v1": assets.path("mistral-v1"), "cl100k": assets.path("cl100k")}
    for name, spec in specs.items():
        mine = getattr(cv, name)().tokens
        v = vocab_mod.load_vocab(spec)
        assert len(v) >= len(mine)
        theirs = [v.token_bytes(i) for i in range(len(v))]
        assert theirs[:len(mine)] == mine and all(t is None for t in theirs[len(mine):])  # tiktoken specials follow
        assert v.table.fingerprint == fingerprint_reference(theirs) == v.fingerprint
