"""The fast ``Vocab.encode_raw`` (pre-tokenizer + compiled BPE, ctalign.vocab.hf_fast_raw.FastRawEncoder)
against the library path (``encode_raw(..., fast=False)``: HF ``encode_batch`` on the
no-prefix-space copy), which is the definition: over every token of real teacher vocabularies, a
multilingual corpus, added-token text, and random strings."""
from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import get_test_vocab

PAIRS = [
    ("qwen", "llama3"),
    ("llama3", "deepseek-v3"),
    ("cl100k", "gpt2"),
    ("llama3", "qwen"),
    ("mistral-v1", "llama3"),
    ("deepseek-v3", "llama3"),
]
FAST_STUDENTS = ["llama3", "deepseek-v3", "gpt2"]  # HF byte-level BPE: the fast path applies


def _all_pieces(name: str) -> list[bytes]:
    return [p for p in get_test_vocab(name).all_token_bytes() if p is not None]


def _assert_same(student, pieces: list[bytes]) -> None:
    fast = student.encode_raw(pieces)
    slow = student.encode_raw(pieces, fast=False)
    assert len(fast) == len(slow) == len(pieces)
    bad = [(p, f, s) for p, f, s in zip(pieces, fast, slow) if f != s]
    assert not bad, f"{len(bad)} pieces differ, e.g. {bad[:5]}"


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_every_teacher_token(teacher, student):
    s = get_test_vocab(student)
    if student in FAST_STUDENTS:
        assert s._fast_raw_encoder is not None
    _assert_same(s, _all_pieces(teacher))


@pytest.mark.parametrize("student", FAST_STUDENTS)
def test_corpus_lines_and_words(student, corpus_lines, corpus_text):
    s = get_test_vocab(student)
    words = corpus_text.split(" ")
    pieces = [ln.encode() for ln in corpus_lines] + [(" " + w).encode() for w in words] + \
        [w.encode() for w in words]
    assert len(pieces) > 256  # the whole-piece shapes are in use
    _assert_same(s, pieces)


def test_added_token_text_goes_through_the_library():
    s = get_test_vocab("deepseek-v3")
    added = [a for a in s._backend.raw_tokenizer.get_added_tokens_decoder().values() if not a.special]
    assert added
    pieces = [f"x{a.content}y".encode() for a in added[:50]] + [a.content.encode() for a in added[:50]]
    pieces += _all_pieces("llama3")[:1000]
    _assert_same(s, pieces)


def test_environment_forces_the_library_path(monkeypatch):
    s = get_test_vocab("llama3")
    s.prepare_encode_raw()
    enc = s._fast_raw_encoder
    calls = []
    monkeypatch.setattr(enc, "encode", lambda texts, slow: calls.append(1) or slow(texts))
    s.encode_raw([b"hello", b" world"])
    assert calls == [1]
    monkeypatch.setenv("CTALIGN_ENCODE_RAW", "slow")
    s.encode_raw([b"hello", b" world"])
    s.encode_raw([b"hello"], fast=False)
    assert calls == [1]
    s.encode_raw([b"hello"], fast=True)
    assert calls == [1, 1]


def test_small_calls_do_not_build_the_compiled_bpe():
    from conftest import vocab_spec
    from ctalign.vocab import load_vocab
    v = load_vocab(vocab_spec("gpt2"))
    assert v.encode_raw([b"hello"]) == [v.encode("hello")]
    assert "_fast_raw_encoder" not in v.__dict__
    v.prepare_encode_raw()
    assert v._fast_raw_encoder is not None


def test_other_families_have_no_fast_path():
    for name in ("qwen", "mistral-v1", "bert-uncased", "botchan-unigram"):
        assert get_test_vocab(name)._fast_raw_encoder is None


# ---- the whole-piece shapes: a piece they accept is one pre-token of the library --------------------
def _check_shapes(student: str, texts: list[str]) -> int:
    enc = get_test_vocab(student)._fast_raw_encoder
    shape = enc._whole_shape(texts)
    assert shape is not None
    pre = enc._pre_tokenize
    n = 0
    for t in texts:
        if t and shape.fullmatch(t):
            n += 1
            assert [o for _, o in pre(t)] == [(0, len(t))], (student, t, pre(t))
    return n


@pytest.mark.parametrize("student", FAST_STUDENTS)
@pytest.mark.parametrize("teacher", ["qwen", "llama3", "deepseek-v3"])
def test_shapes_on_vocabularies(student, teacher):
    texts = [p.decode("utf-8", "replace") for p in _all_pieces(teacher)]
    whole = _check_shapes(student, texts)
    assert whole > (0.5 if student == "gpt2" else 0.9) * len(texts)


# Characters from every class the patterns tell apart: letters (ASCII, Latin-1, CJK inside and
# outside the DeepSeek ranges, kana incl. the symbol/punctuation ones in those ranges), marks,
# digits of several scripts, ASCII and Unicode punctuation/symbols, every kind of whitespace.
ALPHABET = list("aZsStTdDmMlLrReEvV'é\u00dfĸ中文ア\u30fb\u309b\u30fc\u3005\u0301\u0903"
                "09\u0663\u2163\u00bd!-_.,;\"`~$^|<>\u3002\u201c\u2019 \t\n\r\x0b\x0c\u00a0\u3000\u2028\x85\x00")


@pytest.mark.parametrize("student", FAST_STUDENTS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=6), min_size=1, max_size=40))
def test_shapes_on_random_text(student, texts):
    _check_shapes(student, texts)
    s = get_test_vocab(student)
    pieces = [t.encode() for t in texts] * (257 // len(texts) + 1)  # enough for the shapes
    assert s.encode_raw(pieces) == s.encode_raw(pieces, fast=False)


# ---- every token of every real tokenizer file of the test assets --------------------------------
# The tokenizer files (not the texts, not the llama.cpp test strings); the GGUF types ctalign refuses
# are left out (tests/test_gguf.py checks their errors).
REAL_FILES = ["gpt2", "llama3", "deepseek-v3", "qwen", "cl100k", "gpt2-tiktoken", "whisper-multilingual", "tekken",
              "mistral-v1", "mistral-v3", "botchan-bpe", "botchan-unigram", "kyoto-unigram", "bert-uncased",
              "smollm2-gguf", "gemma3-gguf"] + [f"ggml-vocab-{n}" for n in (
                  "baichuan", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe",
                  "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder")]
BYTE_LEVEL_FILES = ["gpt2", "llama3", "deepseek-v3", "smollm2-gguf"] + [f"ggml-vocab-{n}" for n in (
    "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "mpt", "qwen2", "qwen35", "refact",
    "starcoder")]


@functools.lru_cache(maxsize=1)
def _every_real_piece() -> list[bytes]:
    """The distinct byte strings of every token of every real tokenizer file (about 507k)."""
    pieces = set()
    for name in REAL_FILES:
        pieces.update(p for p in _real_vocab(name).all_token_bytes() if p)
    return sorted(pieces)


def _real_vocab(name: str):
    from ctalign import assets
    try:
        return get_test_vocab(name)
    except assets.AssetError as e:  # no registry here: the CI fetches them first
        pytest.skip(f"asset {name} unavailable: {e}")


COMPILED_FILES = ["gpt2", "llama3", "deepseek-v3"]  # the byte-level files whose default encode_raw is compiled


@pytest.mark.parametrize("name", COMPILED_FILES)
def test_the_compiled_encoder_is_the_library_on_every_token_of_every_real_file(name):
    _assert_same(_real_vocab(name), _every_real_piece())


def test_every_other_byte_level_file_encodes_with_the_library():
    """The compiled encoder only where the test above proves it equal to the library. llama.cpp's
    command-r vocabulary spells 43 byte strings twice (id 297 "▪" beside its byte-level twin 237072):
    the compiled BPE gave 297 where the library gives 237072, on 17 of the pieces above. The GGUF
    byte-level files have pre-tokenizers without known whole-piece shapes (no gain compiled)."""
    from ctalign.vocab.hf import _model_spells_a_string_twice
    compiled = {n for n in BYTE_LEVEL_FILES if _real_vocab(n)._fast_raw_encoder is not None}
    assert compiled == set(COMPILED_FILES)
    command_r = _real_vocab("ggml-vocab-command-r")
    assert _model_spells_a_string_twice(command_r, set(command_r._backend.raw_tokenizer.get_added_tokens_decoder()))
    assert _real_vocab("ggml-vocab-command-r").ids_of_bytes("▪".encode()) == [297, 237072]
    assert command_r.encode_raw(["▪".encode()] * 300) == [[237072]] * 300  # 300: the compiled path's batch size
    assert not _model_spells_a_string_twice(_real_vocab("llama3"), set())
