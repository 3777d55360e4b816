"""MergeTable (cpp/merge_table.h): merge recursion and compiled BPE against the tokenizers' own code."""
from __future__ import annotations

import gc
import json
import random
from functools import lru_cache

import numpy as np
import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

import core_vocab_files as cv
from ctalign import _core

TEXT = cv.MULTILINGUAL_TEXT + "\n" + "x" * 300 + " " * 200 + "\n"  # long pieces take the heap path
_B2U = {b: c for c, b in cv.gpt2_byte_decoder().items()}
_DEC = cv.gpt2_byte_decoder()


def text():
    return cv.botchan_text()[:60000] + TEXT


def mapped(b: bytes) -> str:
    """Bytes in the GPT-2 byte alphabet (how HF byte-level BPE spells them)."""
    return "".join(_B2U[x] for x in b)


def csr_rows(offsets, ids):
    return [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


# ---- fixtures: real vocabularies, their tables and their own tokenizers ------------------------
@lru_cache(maxsize=None)
def built(name: str):
    rv = getattr(cv, name)()
    table = rv.table()
    if name == "mistral_v1" or name == "botchan_bpe":
        mt = _core.MergeTable.from_ranks(table, sp_priority(rv), initial="chars")
    elif rv.priority is not None:
        mt = _core.MergeTable.from_ranks(table, rv.priority_array())
    else:
        mt = _core.MergeTable.from_merges(table, rv.merges_array(), ignore_merges=(name == "llama3"))
    return rv, table, mt


def sp_priority(rv):
    """SentencePiece BPE merges the pair of highest score, leftmost on ties: dense ranks of -score."""
    sp = rv.extra["sp"]
    scores = {i: sp.get_score(i) for i, p in enumerate(rv.priority) if p >= 0}
    dense = {s: r for r, s in enumerate(sorted(set(scores.values()), reverse=True))}
    return np.array([dense[scores[i]] if i in scores else -1 for i in range(len(rv.tokens))], dtype=np.int32)


@lru_cache(maxsize=None)
def tiktoken_encoding(name: str):
    rv = getattr(cv, name)()
    return tiktoken.Encoding(name, pat_str=rv.pattern, mergeable_ranks=rv.extra["ranks"], special_tokens={})


@lru_cache(maxsize=None)
def hf_tokenizer(name: str, ignore_merges: bool | None = None) -> Tokenizer:
    """The HF tokenizer (its own pre-tokenizer and BPE model); GPT-2 built from encoder.json/vocab.bpe."""
    if name == "gpt2":
        rv = cv.gpt2()
        merges = [(mapped(rv.tokens[a]), mapped(rv.tokens[b])) for a, b in rv.merges]
        from tokenizers import pre_tokenizers
        tok = Tokenizer(models.BPE(vocab=rv.extra["encoder"], merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        return tok
    j = getattr(cv, name)().extra["json"]
    if ignore_merges is not None:
        j = dict(j, model=dict(j["model"], ignore_merges=ignore_merges))
    return Tokenizer.from_str(json.dumps(j))


def hf_bpe(tok: Tokenizer, b: bytes) -> list[int]:
    return [t.id for t in tok.model.tokenize(mapped(b))]


# ---- encodings against the tokenizers' own code -------------------------------------------------
@pytest.mark.parametrize("name", ["cl100k", "qwen", "gpt2_tiktoken"])
def test_from_ranks_matches_tiktoken_on_text(name):
    rv, table, mt = built(name)
    enc = tiktoken_encoding(name)
    t = text()
    pieces = [m.encode() for m in regex.findall(rv.pattern, t)]
    offsets, ids = mt.encode_many(pieces)
    assert ids.tolist() == enc.encode_ordinary(t)
    assert csr_rows(offsets, ids) == [enc._core_bpe.encode_single_piece(p) for p in pieces]


def byte_strings(tokens):
    """Random bytes, text, and concatenations of real tokens (which merge a lot), short and long."""
    return st.one_of(
        st.binary(max_size=40),
        st.binary(min_size=129, max_size=400),
        st.text(max_size=60).map(lambda s: s.encode()),
        st.lists(st.sampled_from(tokens), max_size=120).map(b"".join),
        st.tuples(st.sampled_from([b" ", b"a", b"\n", b"ab", b"1"]), st.integers(1, 700)).map(lambda x: x[0] * x[1]),
    )


_CL100K_SAMPLE = [t for t in cv.cl100k().tokens[::97] if t]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(byte_strings(_CL100K_SAMPLE))
def test_from_ranks_random_bytes_cl100k(b):
    _, _, mt = built("cl100k")
    want = tiktoken_encoding("cl100k")._core_bpe.encode_single_piece(b) if b else []  # tiktoken panics on b""
    assert mt.encode(b) == want


@pytest.mark.parametrize("name", ["gpt2", "llama3", "deepseek"])
def test_from_merges_matches_hf_on_text(name):
    rv, table, mt = built(name)
    tok = hf_tokenizer(name)
    t = text()
    pieces = [bytes(_DEC[c] for c in p) for p, _ in tok.pre_tokenizer.pre_tokenize_str(t)]
    offsets, ids = mt.encode_many(pieces)
    assert ids.tolist() == tok.encode(t, add_special_tokens=False).ids


_GPT2_SAMPLE = [t for t in cv.gpt2().tokens[::37] if t]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(byte_strings(_GPT2_SAMPLE))
def test_from_merges_random_bytes_gpt2(b):
    _, _, mt = built("gpt2")
    assert mt.encode(b) == hf_bpe(hf_tokenizer("gpt2"), b)


def test_llama3_ignore_merges_and_unreachable_tokens():
    rv, table, mt = built("llama3")
    pure = _core.MergeTable.from_merges(table, rv.merges_array())
    hf_pure = hf_tokenizer("llama3", ignore_merges=False)
    ids = [i for i in range(table.size) if rv.tokens[i] is not None]
    want = [hf_bpe(hf_pure, rv.tokens[i]) for i in ids]
    reachable = [w == [i] for i, w in zip(ids, want)]
    assert pure.reachable[ids].astype(bool).tolist() == reachable
    assert mt.reachable[ids].astype(bool).tolist() == reachable  # reachable ignores ignore_merges
    unreachable = [i for i, r in zip(ids, reachable) if not r]
    assert 0 < len(unreachable) < 2000  # Llama-3 has a few hundred
    assert csr_rows(*pure.encode_many([rv.tokens[i] for i in ids])) == want
    # ignore_merges (Llama-3's setting): a pre-token that is a token comes back whole.
    assert all(mt.encode(rv.tokens[i]) == [i] for i in unreachable)
    assert all(pure.left[i] == -1 and pure.rank[i] == -1 for i in unreachable)


@pytest.mark.parametrize("name", ["mistral_v1", "botchan_bpe"])
def test_sentencepiece_bpe_chars_mode_matches_sentencepiece(name):
    rv, table, mt = built(name)
    sp = rv.extra["sp"]
    known = {c for t in rv.tokens if t for c in t.decode("utf-8", "ignore")}
    words = sorted(set(text().split()))
    checked = 0
    for w in words:
        if name == "botchan_bpe" and not set(w) <= known:
            continue  # no byte fallback: SentencePiece gives <unk>, the encoder raises (tested below)
        assert mt.encode((" " + w).encode()) == sp.encode(w), w
        checked += 1
    assert checked > 0.9 * len(words)


# ---- the merge recursion ---------------------------------------------------------------------
ALL = ["gpt2", "gpt2_tiktoken", "cl100k", "qwen", "llama3", "deepseek", "mistral_v1"]


@pytest.mark.parametrize("name", ALL)
def test_recursion_invariants(name):
    rv, table, mt = built(name)
    V = table.size
    left, right, rank, reach = (np.array(x) for x in (mt.left, mt.right, mt.rank, mt.reachable))
    for b in range(256):
        t = mt.base_token[b]
        if t >= 0:
            assert rv.tokens[t] == bytes([b]) and left[t] == -1 and reach[t] == 1
        else:
            assert bytes([b]) not in rv.tokens
    merged = np.where(left >= 0)[0]
    assert (right[merged] >= 0).all() and (rank[merged] >= 0).all() and reach[merged].all()
    assert all(rv.tokens[t] == rv.tokens[left[t]] + rv.tokens[right[t]] for t in merged)
    assert ((left == -1) == (rank == -1)).all() and ((left == -1) == (right == -1)).all()
    specials = [i for i in range(V) if rv.tokens[i] is None]
    assert (left[specials] == -1).all() and (reach[specials] == 0).all()
    if name == "mistral_v1":  # SentencePiece scores tie: parts may share the result's priority
        assert (rank[left[merged]] <= rank[merged]).all() and (rank[right[merged]] <= rank[merged]).all()
    elif name != "llama3":  # Llama-3's merge list has a few merges whose parts rank later
        assert (rank[left[merged]] < rank[merged]).all() and (rank[right[merged]] < rank[merged]).all()
    if rv.merges is None:  # ranks: the merge is the result's own priority
        pr = sp_priority(rv) if mt.initial == "chars" else rv.priority_array()
        assert (rank[merged] == pr[merged]).all()
    # Reachable tokens encode to themselves (byte-level vocabularies without ignore_merges).
    if name in ("gpt2", "gpt2_tiktoken", "cl100k", "qwen", "deepseek"):
        ids = np.where(reach == 1)[0]
        offsets, out = mt.encode_many([rv.tokens[i] for i in ids])
        assert np.array_equal(np.diff(offsets), np.ones(len(ids))) and np.array_equal(out, ids)


def restricted_bpe(b: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Textbook BPE over bytes with the merges of rank < max_rank (leftmost lowest first)."""
    parts = [b[i:i + 1] for i in range(len(b))]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@pytest.mark.parametrize("name", ["cl100k", "qwen"])
def test_from_ranks_definition_on_a_sample(name):
    """A token's merge is the last merge of BPE over its bytes with lower ranks only."""
    rv, table, mt = built(name)
    ranks = rv.extra["ranks"]
    rng = random.Random(4)
    for t in rng.sample([i for i, b in enumerate(rv.tokens) if b and len(b) > 1], 400):
        parts = restricted_bpe(rv.tokens[t], ranks, rv.priority[t])
        assert len(parts) == 2
        assert (mt.left[t], mt.right[t], mt.rank[t]) == (ranks[parts[0]], ranks[parts[1]], rv.priority[t])


def test_from_ranks_agrees_with_from_merges_gpt2():
    rv, table, by_merges = built("gpt2")
    rt, table_t, by_ranks = built("gpt2_tiktoken")
    V = table_t.size  # 50256: gpt2.tiktoken lacks <|endoftext|>
    assert rt.tokens == rv.tokens[:V]
    assert np.array_equal(by_ranks.left, by_merges.left[:V])
    assert np.array_equal(by_ranks.right, by_merges.right[:V])
    merged = by_merges.left[:V] >= 0
    assert np.array_equal(by_ranks.rank[merged], by_merges.rank[:V][merged] + 256)  # ranks count the bytes
    assert np.array_equal(by_ranks.reachable, by_merges.reachable[:V])
    assert np.array_equal(by_ranks.base_token, by_merges.base_token)
    pieces = [m.encode() for m in regex.findall(cv.GPT2_PATTERN, text())]
    assert np.array_equal(by_ranks.encode_many(pieces)[1], by_merges.encode_many(pieces)[1])


# ---- unrolling ---------------------------------------------------------------------------------
def keep_first_merges(name, n):
    """keep = base pieces + results of the first n merges, and the encoder that has only those."""
    rv, table, mt = built(name)
    if rv.merges is not None:
        keep = np.zeros(table.size, dtype=np.uint8)
        keep[mt.base_token[mt.base_token >= 0]] = 1
        for a, b in rv.merges[:n]:
            keep[table.lookup(rv.tokens[a] + rv.tokens[b])[0]] = 1
        small = _core.MergeTable.from_merges(table, rv.merges_array()[:n])
    else:
        base = (mt.left < 0) & (mt.reachable == 1)
        pr = sp_priority(rv) if mt.initial == "chars" else rv.priority_array()
        merged = np.sort(pr[(pr >= 0) & ~base])
        cut = merged[min(n, len(merged)) - 1] + 1 if n > 0 else 0
        small_pr = np.where((pr < cut) | base, pr, -1).astype(np.int32)
        small = _core.MergeTable.from_ranks(table, small_pr, initial=mt.initial)
        keep = ((small.reachable == 1) & (table.has_bytes == 1)).astype(np.uint8)
    return keep, small


@pytest.mark.parametrize("name", ["gpt2", "deepseek", "cl100k", "mistral_v1"])
@pytest.mark.parametrize("n", [0, 300, 5000, 30000])
def test_unroll_all_first_merges_is_bpe_with_those_merges(name, n):
    rv, table, mt = built(name)
    keep, small = keep_first_merges(name, n)
    offsets, ids = mt.unroll_all(keep)
    want_offsets, want_ids = small.encode_many(table.offsets, table.data)
    assert np.array_equal(offsets, want_offsets) and np.array_equal(ids, want_ids)
    assert keep[ids].all()
    rng = random.Random(n)
    for t in rng.sample(range(table.size), 50):
        assert mt.unroll(t, keep) == ids[offsets[t]:offsets[t + 1]].tolist()


@pytest.mark.parametrize("n", [0, 1000, 20000])
def test_bpe_with_first_merges_matches_hf(n):
    """The restricted encoder itself against HF BPE given the same truncated merge list."""
    rv = cv.gpt2()
    _, small = keep_first_merges("gpt2", n)
    merges = [(mapped(rv.tokens[a]), mapped(rv.tokens[b])) for a, b in rv.merges[:n]]
    hf = models.BPE(vocab=rv.extra["encoder"], merges=merges)
    rng = random.Random(n)
    for t in rng.sample([i for i, b in enumerate(rv.tokens) if b], 2000):
        assert small.encode(rv.tokens[t]) == [x.id for x in hf.tokenize(mapped(rv.tokens[t]))]


def test_unroll_keep_everything_and_specials():
    rv, table, mt = built("gpt2")
    keep = np.ones(table.size, dtype=bool)
    offsets, ids = mt.unroll_all(keep)
    special = rv.extra["encoder"]["<|endoftext|>"]
    rows = csr_rows(offsets, ids)
    assert rows[special] == [] and mt.unroll(special, keep) == []
    assert all(rows[i] == [i] for i in range(table.size) if i != special)


def test_unroll_unreachable_goes_through_bpe_pieces():
    rv, table, mt = built("llama3")
    keep, _ = (np.ones(table.size, dtype=np.uint8), None)
    unreachable = np.where((mt.reachable == 0) & (table.has_bytes == 1))[0]
    keep[unreachable] = 0
    pure = _core.MergeTable.from_merges(table, rv.merges_array())
    for t in unreachable[:200].tolist():
        assert mt.unroll(t, keep) == pure.encode(rv.tokens[t])


# ---- bindings, errors, speed ---------------------------------------------------------------
def test_views_and_properties():
    rv, table, mt = built("gpt2")
    assert mt.table.fingerprint == table.fingerprint and mt.size == table.size
    assert mt.n_merges == len(rv.merges) and mt.initial == "bytes" and mt.ignore_merges is False
    views = [mt.left, mt.right, mt.rank, mt.base_token, mt.reachable]
    assert [v.dtype for v in views] == [np.int32] * 4 + [np.uint8]
    assert all(not v.flags.writeable and v.base is mt for v in views)
    small = _core.MergeTable.from_merges(table, rv.merges_array()[:10])
    left = small.left
    del small
    gc.collect()
    assert left[256:266].tolist() == [a for a, _ in rv.merges[:10]]


def test_encode_many_forms_agree():
    rv, table, mt = built("cl100k")
    pieces = [m.encode() for m in regex.findall(rv.pattern, cv.MULTILINGUAL_TEXT)]
    o1, i1 = mt.encode_many(pieces)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    o2, i2 = mt.encode_many(offsets, np.frombuffer(b"".join(pieces), dtype=np.uint8))
    assert np.array_equal(o1, o2) and np.array_equal(i1, i2)
    assert csr_rows(o1, i1) == [mt.encode(p) for p in pieces]
    assert o1.dtype == np.int64 and i1.dtype == np.int32
    assert mt.encode(b"") == [] and mt.encode_many([])[0].tolist() == [0]


def test_bad_input_errors():
    rv, table, mt = built("gpt2")
    m = rv.merges_array()
    a, b = rv.extra["encoder"]["z"], rv.extra["encoder"]["q"]  # b"zq" is no GPT-2 token
    with pytest.raises(ValueError, match=rf"merge 3 \({a}, {b}\) = b'z' \+ b'q' gives b'zq', which is no token"):
        _core.MergeTable.from_merges(table, np.concatenate([m[:3], [[a, b]], m[3:]]).astype(np.int32))
    with pytest.raises(ValueError, match=r"merge 1 \(0, 60000\): id 60000 out of range"):
        _core.MergeTable.from_merges(table, np.array([[0, 1], [0, 60000]], dtype=np.int32))
    with pytest.raises(ValueError, match="id 50256 is a special token"):
        _core.MergeTable.from_merges(table, np.array([[50256, 1]], dtype=np.int32))
    with pytest.raises(TypeError, match="merges: expected dtype int32"):
        _core.MergeTable.from_merges(table, m.astype(np.int64))
    with pytest.raises(ValueError, match=r"merges: expected shape \(K, 2\)"):
        _core.MergeTable.from_merges(table, m.reshape(-1, 4))
    with pytest.raises(ValueError, match="merges: expected a 2-d array"):
        _core.MergeTable.from_merges(table, m.reshape(-1))
    with pytest.raises(ValueError, match="initial: expected 'bytes' or 'chars'"):
        _core.MergeTable.from_merges(table, m, initial="words")
    with pytest.raises(ValueError, match="priority: has 3 entries, expected V = 50257"):
        _core.MergeTable.from_ranks(table, np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match=r"priority\[5\] = -2"):
        _core.MergeTable.from_ranks(table, np.where(np.arange(table.size) == 5, -2, 0).astype(np.int32))
    with pytest.raises(TypeError, match="data: expected bytes"):
        mt.encode("text")
    with pytest.raises(TypeError, match="pieces: expected bytes"):
        mt.encode_many([b"a", "b"])
    keep = np.ones(table.size, dtype=np.uint8)
    keep[mt.base_token[ord("a")]] = 0
    t = table.lookup(b"aaaa")[0]
    with pytest.raises(ValueError, match=rf"token {mt.base_token[ord('a')]} b'a' \(in the merge tree of token {t}\) is not kept"):
        keep_t = keep.copy()
        keep_t[t] = 0
        keep_t[mt.left[t]] = keep_t[mt.right[t]] = 0
        mt.unroll(t, keep_t)
    with pytest.raises(ValueError, match="keep: has 5 entries, expected V = 50257"):
        mt.unroll_all(np.ones(5, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"MergeTable.unroll: id 50257 out of range"):
        mt.unroll(50257, np.ones(table.size, dtype=np.uint8))
    # A byte without a base token (botchan-bpe has no byte fallback and no '#').
    _, _, sp_mt = built("botchan_bpe")
    with pytest.raises(ValueError, match=r"byte 0x23 at position 3 of b'ab #' has no base token"):
        sp_mt.encode(b"ab #")


def test_toy_table_semantics():
    """Leftmost among equal ranks; duplicate merges keep the first rank; chars vs bytes."""
    table = _core.TokenTable.from_list([b"a", b"aa", b"aaa", b"\xc3", b"\xa9", "é".encode(), b"\xc3\xa9a", None])
    mt = _core.MergeTable.from_merges(table, np.array([[0, 0], [1, 0], [0, 0], [5, 0]], dtype=np.int32))
    assert mt.encode(b"aaaa") == [1, 1]  # leftmost first: (a a)(a a), never a (a a) a -> a aaa
    assert mt.encode(b"aaaaa") == [1, 2]  # aa a a a -> aa aa a -> aa aaa
    assert mt.encode(b"aaa") == [2] and (mt.left[2], mt.right[2], mt.rank[2]) == (1, 0, 1)
    assert mt.n_merges == 4 and mt.rank[1] == 0  # the repeated merge (a, a) keeps rank 0
    chars = _core.MergeTable.from_merges(table, np.array([[5, 0]], dtype=np.int32), initial="chars")
    assert chars.encode("éa".encode()) == [6] and chars.reachable[5] == 1 and chars.left[6] == 5
    by_bytes = _core.MergeTable.from_merges(table, np.array([[5, 0]], dtype=np.int32))
    assert by_bytes.encode("éa".encode()) == [3, 4, 0] and by_bytes.reachable[5] == 0
