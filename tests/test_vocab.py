"""Vocabularies of real tokenizers in one byte space (ctalign.vocab).

Expected sizes, special ids and roles are the tokenizers' documented facts; everything else is
checked against an independent source: the tokenizer library's own encoder, a second file format
of the same vocabulary (GPT-2 encoder.json/vocab.bpe vs its tiktoken rank file; Llama-3
tokenizer.json vs a rank file written from it), or a brute-force BPE written here.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import time
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from conftest import TEST_VOCABS, get_test_vocab, vocab_spec
from ctalign.errors import VocabError
from ctalign.vocab import Vocab, load_vocab, bytes_to_unicode, unicode_to_bytes

# Documented vocabulary sizes (ids, including specials and reserved ids).
SIZES = {
    "gpt2": 50257, "gpt2-tiktoken": 50257, "whisper-multilingual": 51865, "llama3": 128256,
    "qwen": 151851, "deepseek-v3": 129280, "cl100k": 100277, "mistral-v1": 32000, "mistral-v3": 32768,
    "tekken": 131072, "botchan-bpe": 1000, "botchan-unigram": 1000, "kyoto-unigram": 8000,
    "bert-uncased": 30522,
}
KINDS = {
    "gpt2": "byte_bpe", "gpt2-tiktoken": "tiktoken", "whisper-multilingual": "tiktoken",
    "llama3": "byte_bpe", "qwen": "tiktoken", "deepseek-v3": "byte_bpe", "cl100k": "tiktoken",
    "mistral-v1": "sentencepiece_bpe", "mistral-v3": "sentencepiece_bpe", "tekken": "tekken",
    "botchan-bpe": "sentencepiece_bpe", "botchan-unigram": "unigram", "kyoto-unigram": "unigram",
    "bert-uncased": "wordpiece",
}
# Documented special tokens: role -> (id, text).
ROLES = {
    "gpt2": {"eos": (50256, "<|endoftext|>")},
    "gpt2-tiktoken": {"eos": (50256, "<|endoftext|>")},
    "whisper-multilingual": {"eos": (50257, "<|endoftext|>")},
    "llama3": {"bos": (128000, "<|begin_of_text|>"), "eos": (128001, "<|end_of_text|>")},
    "qwen": {"eos": (151643, "<|endoftext|>")},
    "deepseek-v3": {"bos": (0, "<｜begin▁of▁sentence｜>"), "eos": (1, "<｜end▁of▁sentence｜>"),
                    "pad": (2, "<｜▁pad▁｜>")},
    "cl100k": {"eos": (100257, "<|endoftext|>")},
    "mistral-v1": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>")},
    "mistral-v3": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>")},
    "tekken": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (11, "<pad>")},
    "botchan-bpe": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>")},
    "botchan-unigram": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>")},
    "kyoto-unigram": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>")},
    "bert-uncased": {"pad": (0, "[PAD]"), "unk": (100, "[UNK]"), "bos": (101, "[CLS]"),
                     "eos": (102, "[SEP]")},
}
N_SPECIALS = {"gpt2": 1, "gpt2-tiktoken": 1, "cl100k": 5, "llama3": 256, "qwen": 208, "tekken": 1000,
              "whisper-multilingual": 1608, "mistral-v1": 3, "bert-uncased": 5}
# Tokenizers whose encoders never lose a byte (no unk, no lossy normalizer).
EXACT = ["gpt2", "gpt2-tiktoken", "whisper-multilingual", "llama3", "qwen", "deepseek-v3", "cl100k",
         "mistral-v1", "mistral-v3", "tekken"]
LOSSY = ["botchan-bpe", "botchan-unigram", "kyoto-unigram", "bert-uncased"]


# ---- helpers ----------------------------------------------------------------------------------------
def _spell(v: Vocab, ids: list[int]) -> bytes:
    """A regex over bytes: the tokens' bytes, each unk standing for one or more characters."""
    parts = []
    for i in ids:
        b = v.token_bytes(i)
        if b is not None:
            parts.append(re.escape(b))
        elif i == v.unk_id:
            parts.append(b"(?:.+?)")
        else:
            raise AssertionError(f"{v.name}: encode produced special id {i} ({v.special_text.get(i)!r})")
    return b"".join(parts)


def assert_round_trip(v: Vocab, text: str) -> None:
    """Concatenated token bytes of encode(text) equal the normalized text (module docstring of
    ctalign.vocab): one prefix space where recorded, unk = any characters, WordPiece drops
    whitespace."""
    ids = v.encode(text)
    expected = v.normalize(text)
    if v.kind == "wordpiece":
        expected = "".join(ch for ch in expected if not ch.isspace())
    exp = expected.encode("utf-8")
    if v.unk_id is None or v.unk_id not in ids:
        got = v.decode_bytes(ids)
        if v.prefix_space and exp and not exp.startswith(b" "):
            assert got == b" " + exp, f"{v.name}: prefix space missing or bytes differ"
        elif v.prefix_space:
            assert got in (exp, b" " + exp), f"{v.name}: bytes differ"
        else:
            assert got == exp, _first_difference(got, exp, v.name)
        return
    pattern = re.compile(_spell(v, ids), re.DOTALL)
    candidates = [exp, b" " + exp] if v.prefix_space else [exp]
    assert any(pattern.fullmatch(c) for c in candidates), f"{v.name}: bytes (with unk) differ"


def _first_difference(got: bytes, exp: bytes, name: str) -> str:
    k = next((i for i, (a, b) in enumerate(zip(got, exp)) if a != b), min(len(got), len(exp)))
    return f"{name}: bytes differ at {k}: got {got[k - 20:k + 20]!r}, expected {exp[k - 20:k + 20]!r}"


def _pieces_with_ids(v: Vocab) -> tuple[list[bytes], list[int]]:
    ids = [i for i in range(len(v)) if v.token_bytes(i) is not None]
    return [v.token_bytes(i) for i in ids], ids


# ---- sizes, kinds, specials --------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEST_VOCABS)
def test_size_kind_and_byte_table(name):
    v = get_test_vocab(name)
    assert len(v) == v.size == SIZES[name]
    assert v.kind == KINDS[name]
    offsets, data, has_bytes = v.byte_table()
    assert offsets.dtype == np.int64 and data.dtype == np.uint8 and has_bytes.dtype == np.uint8
    assert offsets.shape == (len(v) + 1,) and has_bytes.shape == (len(v),)
    assert offsets[0] == 0 and offsets[-1] == data.size and np.all(np.diff(offsets) >= 0)
    for i in np.random.default_rng(0).integers(0, len(v), 300):
        b = v.token_bytes(int(i))
        assert data[offsets[i]:offsets[i + 1]].tobytes() == (b or b"")
        assert has_bytes[i] == (b is not None)
    assert all(v.token_bytes(i) is None for i in v.specials)
    with pytest.raises(IndexError):
        v.token_bytes(len(v))


@pytest.mark.parametrize("name", TEST_VOCABS)
def test_specials_and_roles(name):
    v = get_test_vocab(name)
    for role, (i, text) in ROLES[name].items():
        assert v.special_ids[role] == i, (role, v.special_ids)
        assert v.specials[i] == role
        assert v.special_text[i] == text
        assert v.token_bytes(i) is None
    assert set(v.specials.values()) <= {"bos", "eos", "pad", "unk", "other"}
    if name in N_SPECIALS:
        assert len(v.specials) == N_SPECIALS[name]
    report = v.describe()
    json.dumps(report)
    assert report["size"] == len(v) and report["kind"] == v.kind
    assert report["n_specials"] == len(v.specials)
    assert {"name", "prefix_space", "lossy_normalizer", "special_roles"} <= set(report)


def test_special_token_lists_match_the_tokenizer_libraries():
    mistral = get_test_vocab("mistral-v3")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(vocab_spec("mistral-v3")))
    controls = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    assert set(mistral.specials) == controls
    assert mistral.special_text[3] == "[INST]" and mistral.specials[3] == "other"
    tekken = get_test_vocab("tekken")
    assert [tekken.special_text[i] for i in (3, 4, 19, 20, 999)] == [
        "[INST]", "[/INST]", "[TOOL_CONTENT]", "<SPECIAL_20>", "<SPECIAL_999>"]
    assert all(tekken.token_bytes(i) is None for i in range(1000))
    assert tekken.ranks[:3] == [1000, 1001, 1002] and len(tekken.ranks) == 130072
    cl = get_test_vocab("cl100k")
    assert cl.special_text == {100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
                               100260: "<|fim_suffix|>", 100276: "<|endofprompt|>"}
    assert cl.token_bytes(100256) is None and 100256 not in cl.specials  # an id no token has
    assert cl.describe()["n_ids_without_token"] == 100277 - 100256 - 5
    deepseek = get_test_vocab("deepseek-v3")
    user = deepseek.ids_of_bytes("<｜User｜>".encode())  # a non-special added token keeps its text
    assert len(user) == 1 and user[0] not in deepseek.specials


# ---- byte round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEST_VOCABS)
def test_round_trip_corpus(name, corpus_text, corpus_lines):
    v = get_test_vocab(name)
    assert_round_trip(v, corpus_text)
    for line in corpus_lines:
        assert_round_trip(v, line)


@pytest.mark.parametrize("name", TEST_VOCABS)
def test_round_trip_botchan(name, botchan_text):
    assert_round_trip(get_test_vocab(name), botchan_text)


@pytest.mark.parametrize("name", EXACT)
def test_exact_tokenizers_lose_nothing(name, corpus_text):
    v = get_test_vocab(name)
    assert v.lossy_normalizer is None
    ids = v.encode(corpus_text)
    assert v.unk_id not in ids
    got = v.decode_bytes(ids)
    text = unicodedata.normalize("NFC", corpus_text) if v.normalizer == "nfc" else corpus_text
    assert got.removeprefix(b" " if v.prefix_space else b"") == text.encode()


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_normalizers_are_recorded(name):
    v = get_test_vocab(name)
    assert v.lossy_normalizer
    if name == "bert-uncased":
        assert {"lowercase", "strip_accents", "drop_whitespace"} <= set(v.lossy_normalizer.split("+"))
        assert v.normalize("Café ÀB") == "cafe ab"
    else:
        assert "collapse_whitespace" in v.lossy_normalizer
        assert v.normalize("a   ﬁ  b") == "a fi b"  # NFKC folds the ligature, spaces collapse


def test_prefix_space_recorded():
    for name in TEST_VOCABS:
        v = get_test_vocab(name)
        assert v.prefix_space == (v.kind in ("sentencepiece_bpe", "unigram")), name
    mistral = get_test_vocab("mistral-v1")
    assert mistral.decode_bytes(mistral.encode("Hello")) == b" Hello"
    llama = get_test_vocab("llama3")
    assert llama.decode_bytes(llama.encode("Hello")) == b"Hello"


# ---- same bytes for several ids, word starts, merges, ranks --------------------------------------
def test_space_and_byte_piece_share_bytes():
    import sentencepiece as spm
    for name in ("mistral-v1", "mistral-v3"):
        v = get_test_vocab(name)
        sp = spm.SentencePieceProcessor(model_file=str(vocab_spec(name)))
        space, byte20 = sp.piece_to_id("\u2581"), sp.piece_to_id("<0x20>")
        assert space != byte20
        assert v.token_bytes(space) == v.token_bytes(byte20) == b" "
        assert set(v.ids_of_bytes(b" ")) == {space, byte20}
        for b in range(256):  # every byte piece maps to its byte
            assert v.token_bytes(sp.piece_to_id(f"<0x{b:02X}>")) == bytes([b])


def test_wordpiece_word_start():
    v = get_test_vocab("bert-uncased")
    data = json.loads(vocab_spec("bert-uncased").read_text(encoding="utf-8"))["model"]["vocab"]
    assert v.word_start is not None and v.word_start.dtype == np.bool_ and v.word_start.shape == (len(v),)
    for text, i in list(data.items())[::97]:
        if i in v.specials:
            assert not v.word_start[i]
        elif text.startswith("##") and len(text) > 2:
            assert not v.word_start[i] and v.token_bytes(i) == text[2:].encode()
        else:
            assert v.word_start[i] and v.token_bytes(i) == text.encode()
    ing = data["##ing"]
    assert v.token_bytes(ing) == b"ing" and not v.word_start[ing]


def test_gpt2_pair_and_rank_file_are_the_same_vocabulary(corpus_text):
    pair, ranks = get_test_vocab("gpt2"), get_test_vocab("gpt2-tiktoken")
    assert pair.all_token_bytes() == ranks.all_token_bytes()
    assert pair.specials == ranks.specials
    assert pair.fingerprint_py() == ranks.fingerprint_py()
    assert pair.encode(corpus_text) == ranks.encode(corpus_text)
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert unicode_to_bytes()["Ġ"] == 0x20


def test_merges_in_rank_order():
    gpt2 = get_test_vocab("gpt2")
    merges = gpt2.merges
    assert len(merges) == 50000
    lines = vocab_spec("gpt2")[1].read_text(encoding="utf-8").splitlines()[1:]
    enc = json.loads(vocab_spec("gpt2")[0].read_text(encoding="utf-8"))
    for k in (0, 1, 777, 49999):
        a, b = lines[k].split(" ")
        assert merges[k] == (enc[a], enc[b])
    llama = get_test_vocab("llama3")
    lm = llama.merges
    raw = json.loads(vocab_spec("llama3").read_text(encoding="utf-8"))["model"]["merges"]
    assert len(lm) == len(raw)
    for a, b in lm[::1000]:  # every merge's result is a token
        assert llama.ids_of_bytes(llama.token_bytes(a) + llama.token_bytes(b))
    assert get_test_vocab("bert-uncased").merges is None


def test_ranks():
    for name, n in (("cl100k", 100256), ("gpt2-tiktoken", 50256), ("qwen", 151643)):
        v = get_test_vocab(name)
        assert v.ranks == list(range(n))
    import sentencepiece as spm
    v = get_test_vocab("mistral-v1")
    sp = spm.SentencePieceProcessor(model_file=str(vocab_spec("mistral-v1")))
    scores = [sp.get_score(i) for i in v.ranks]
    assert scores == sorted(scores, reverse=True)
    assert all(sp.IdToPiece(i) and not sp.is_byte(i) and not sp.is_control(i) for i in v.ranks[:50])
    assert get_test_vocab("botchan-unigram").ranks is None


# ---- encode_raw ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEST_VOCABS)
def test_encode_raw_whole_vocabulary(name, record_property):
    v = get_test_vocab(name)
    pieces, ids = _pieces_with_ids(v)
    v.encode_raw(pieces[:10])  # build the raw encoder outside the timing
    t = time.perf_counter()
    out = v.encode_raw(pieces)
    dt = time.perf_counter() - t
    record_property("encode_raw_seconds", dt)
    assert len(out) == len(pieces)
    single = same = 0
    for p, r in zip(pieces, out):
        assert all(i not in v.specials or i == v.unk_id for i in r)
        got = v.decode_bytes(r)
        if name in EXACT:
            if v.normalizer == "nfc" and p.isascii() is False:
                try:
                    p = unicodedata.normalize("NFC", p.decode()).encode()
                except UnicodeDecodeError:
                    pass
            assert got == p, (name, p, r)
        same += got == p
        single += len(r) == 1 and v.token_bytes(r[0]) == p
    # most tokens are their own tokenization (WordPiece: continuations become word starts)
    assert single / len(pieces) > (0.8 if v.kind == "wordpiece" else 0.98), single / len(pieces)
    assert same / len(pieces) > 0.9


@pytest.mark.parametrize("name", TEST_VOCABS)
def test_encode_raw_adds_no_prefix_space(name, corpus_lines):
    v = get_test_vocab(name)
    lines = [ln for ln in corpus_lines if ln.isascii()]
    outs = v.encode_raw([ln.encode() for ln in lines] + [b"hello", b" hello"])
    for line, r in zip(lines + ["hello", " hello"], outs):
        got = v.decode_bytes(r)
        if name in EXACT:
            assert got == line.encode()
        elif v.kind == "wordpiece":
            assert got == "".join(c for c in line.lower() if not c.isspace()).encode()
    assert v.decode_bytes(outs[-2]) == b"hello"


@pytest.mark.parametrize("name", ["gpt2", "llama3", "deepseek-v3", "cl100k", "qwen", "tekken", "whisper-multilingual"])
def test_encode_raw_equals_encode_without_prefix_space(name, corpus_lines):
    v = get_test_vocab(name)
    assert not v.prefix_space
    assert v.encode_raw([ln.encode() for ln in corpus_lines]) == [v.encode(ln) for ln in corpus_lines]


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_sentencepiece_raw_is_encode_after_dummy_prefix(name, corpus_lines):
    """add_dummy_prefix prepends one space; the raw encoder sees exactly that text."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(vocab_spec(name)))
    v = get_test_vocab(name)
    lines = [ln for ln in corpus_lines if not ln.startswith(" ")]
    assert v.encode_raw([b" " + ln.encode() for ln in lines]) == [sp.encode(ln) for ln in lines]


def _bpe_by_merges(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Brute-force BPE: merge the adjacent pair of lowest merge rank, leftmost first."""
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 60), k) for k, (a, b) in enumerate(zip(word, word[1:]))]
        r, k = min(pairs)
        if r == 1 << 60:
            break
        word[k:k + 2] = [word[k] + word[k + 1]]
    return word


def _bpe_by_ranks(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    parts = [bytes([c]) for c in piece]
    while len(parts) > 1:
        best = min(((ranks.get(a + b, 1 << 60), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))))
        if best[0] == 1 << 60:
            break
        k = best[1]
        parts[k:k + 2] = [parts[k] + parts[k + 1]]
    return [ranks[p] for p in parts]


def _invalid_utf8(pieces: list[bytes]) -> list[bytes]:
    out = []
    for p in pieces:
        try:
            p.decode()
        except UnicodeDecodeError:
            out.append(p)
    return out


def test_encode_raw_invalid_utf8_byte_level_bpe():
    """Fragments of UTF-8 characters: BPE over the raw bytes with the merge list (brute force)."""
    for name in ("gpt2", "deepseek-v3"):
        v = get_test_vocab(name)
        data = json.loads(vocab_spec(name if name != "gpt2" else "gpt2-encoder").read_text(encoding="utf-8"))
        if name == "gpt2":
            enc = data
            lines = vocab_spec("gpt2")[1].read_text(encoding="utf-8").splitlines()[1:]
            merges = [tuple(ln.split(" ")) for ln in lines if ln]
        else:
            enc = data["model"]["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
        ranks = {m: k for k, m in enumerate(merges)}
        b2u = bytes_to_unicode()
        pieces, _ = _pieces_with_ids(v)
        bad = _invalid_utf8(pieces)
        rng = np.random.default_rng(1)
        bad += [bytes(rng.integers(0x80, 0x100, size=int(n)).tolist()) for n in rng.integers(1, 9, 50)]
        bad += [b"abc\xe4\xb8", b"\xff hello \xfe", "日本".encode()[:-1] + b" x"]
        got = v.encode_raw(bad)
        for p, r in zip(bad, got):
            expected = [enc[t] for t in _bpe_by_merges([b2u[c] for c in p], ranks)]
            assert r == expected, (name, p)


def test_encode_raw_invalid_utf8_tiktoken():
    for name in ("cl100k", "qwen", "tekken"):
        v = get_test_vocab(name)
        offset = 1000 if name == "tekken" else 0
        ranks = {v.token_bytes(i): i - offset for i in v.ranks}
        pieces, _ = _pieces_with_ids(v)
        bad = _invalid_utf8(pieces)[:3000]
        bad += [b"\xe4\xb8\xad\xe6", b"\x80\x81\x82", b" \xf0\x9f\x98"]
        for p, r in zip(bad, v.encode_raw(bad)):
            assert r == [i + offset for i in _bpe_by_ranks(p, ranks)], (name, p)


def test_encode_raw_invalid_utf8_byte_fallback_and_unk():
    import sentencepiece as spm
    v = get_test_vocab("mistral-v1")
    sp = spm.SentencePieceProcessor(model_file=str(vocab_spec("mistral-v1")))
    out = v.encode_raw([b"\xff", b"\xe4\xb8", b"ab\xc3"])
    assert out[0] == [sp.piece_to_id("<0xFF>")]
    assert out[1] == [sp.piece_to_id("<0xE4>"), sp.piece_to_id("<0xB8>")]
    assert out[2][-1] == sp.piece_to_id("<0xC3>") and v.decode_bytes(out[2]) == b"ab\xc3"
    for name in ("botchan-bpe", "bert-uncased"):
        w = get_test_vocab(name)
        assert w.encode_raw([b"\xff"]) == [[w.unk_id]]


def test_encode_raw_input_types():
    v = get_test_vocab("cl100k")
    assert v.encode_raw([]) == []
    assert v.encode_raw([b"", bytearray(b"ab"), memoryview(b"ab")]) == [[], v.encode("ab"), v.encode("ab")]
    with pytest.raises(TypeError):
        v.encode_raw([1])
    with pytest.raises(TypeError):
        v.encode(b"bytes")


def test_special_token_text_is_ordinary_text():
    for name in ("llama3", "deepseek-v3", "cl100k", "qwen", "tekken", "mistral-v3", "bert-uncased", "gpt2"):
        v = get_test_vocab(name)
        for text in list(v.special_text.values())[:3]:
            ids = v.encode("x " + text)
            assert not set(ids) & set(v.specials) - {v.unk_id}, (name, text)
            raw = v.encode_raw([text.encode()])[0]
            assert not set(raw) & set(v.specials) - {v.unk_id}, (name, text)


# ---- other formats of real vocabularies ------------------------------------------------------------
def test_llama3_rank_file_matches_tokenizer_json(tmp_path, corpus_text):
    """Meta ships Llama 3 as a tiktoken tokenizer.model: write one from tokenizer.json's vocab."""
    hf = get_test_vocab("llama3")
    data = json.loads(vocab_spec("llama3").read_text(encoding="utf-8"))
    lines = [f"{base64.b64encode(hf.token_bytes(i)).decode()} {i}" for i in sorted(data["model"]["vocab"].values())]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tk = load_vocab(tmp_path / "tokenizer.model")
    assert tk.kind == "tiktoken" and len(tk) == len(hf) == 128256
    assert tk.all_token_bytes() == hf.all_token_bytes()
    assert tk.special_text == hf.special_text
    assert tk.specials == hf.specials
    assert tk.encode(corpus_text) == hf.encode(corpus_text)
    regex = data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    assert tk.details["pattern"] == regex
    assert load_vocab(tmp_path).kind == "tiktoken"  # the directory works too


@pytest.mark.parametrize("name", ["kyoto-unigram", "botchan-unigram"])
def test_hf_unigram_converted_from_sentencepiece(name, tmp_path, corpus_lines):
    """The tokenizers library converts a SentencePiece Unigram model to tokenizer.json
    (Precompiled normalizer, Metaspace): the same pieces, in HF's Unigram/Metaspace form."""
    import sys
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers.implementations import SentencePieceUnigramTokenizer
    sys.modules.setdefault("sentencepiece_model_pb2", sentencepiece_model_pb2)
    hf = SentencePieceUnigramTokenizer.from_spm(str(vocab_spec(name)))
    data = json.loads(hf._tokenizer.to_str())
    data["added_tokens"] = [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False} for i, t in ((1, "<s>"), (2, "</s>"))]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    v = load_vocab(tmp_path / "tokenizer.json")
    sp = get_test_vocab(name)
    assert v.kind == "unigram" and len(v) == len(sp) and v.prefix_space
    assert v.lossy_normalizer and v.unk_id == 0 and v.special_ids == {"unk": 0, "bos": 1, "eos": 2}
    assert v.all_token_bytes() == sp.all_token_bytes()
    for line in corpus_lines:
        assert_round_trip(v, line)
    words = [ln for ln in corpus_lines if ln.isascii() and "  " not in ln and "\t" not in ln]
    assert [v.encode(w.strip()) for w in words] == [sp.encode(w.strip()) for w in words]
    raw = [w.strip().encode() for w in words] + [b" " + w.strip().encode() for w in words]
    assert v.encode_raw(raw) == sp.encode_raw(raw)
    assert v.decode_bytes(v.encode_raw([b"hello"])[0]) == b"hello"


def test_directory_with_tokenizer_config_roles(tmp_path):
    shutil.copy(vocab_spec("llama3"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "pad_token": None}))
    v = load_vocab(tmp_path)
    assert v.name == tmp_path.name
    assert v.special_ids["eos"] == 128009 and v.specials[128009] == "eos"
    assert v.special_ids["bos"] == 128000 and v.specials[128001] == "other"


def test_gpt2_directory(tmp_path):
    (tmp_path / "encoder.json").symlink_to(vocab_spec("gpt2")[0])
    (tmp_path / "vocab.bpe").symlink_to(vocab_spec("gpt2")[1])
    v = load_vocab(tmp_path)
    assert v.kind == "byte_bpe" and len(v) == 50257
    assert v.all_token_bytes() == get_test_vocab("gpt2").all_token_bytes()
    assert load_vocab(tmp_path / "encoder.json").fingerprint_py() == v.fingerprint_py()


def test_tiktoken_with_explicit_pattern(tmp_path, corpus_text):
    from ctalign.vocab.tiktoken_ranks import CL100K_PATTERN
    shutil.copy(vocab_spec("cl100k"), tmp_path / "mine.tiktoken")
    v = load_vocab(tmp_path / "mine.tiktoken", pattern=CL100K_PATTERN, specials={"<|endoftext|>": 100256})
    cl = get_test_vocab("cl100k")
    assert v.encode(corpus_text) == cl.encode(corpus_text)
    assert len(v) == 100257 and v.special_ids == {"eos": 100256}
    w = load_vocab(tmp_path / "mine.tiktoken", encoding="cl100k_base")
    assert w.all_token_bytes() == cl.all_token_bytes()


# ---- compiled views ------------------------------------------------------------------------------------
def test_fingerprint_python_definition():
    import hashlib
    v = get_test_vocab("botchan-bpe")
    h = hashlib.sha256(len(v).to_bytes(8, "little"))
    for i in range(len(v)):
        b = v.token_bytes(i) or b""
        h.update(bytes([b != b""]) + len(b).to_bytes(8, "little") + b)
    assert v.fingerprint_py() == h.hexdigest()
    assert get_test_vocab("mistral-v1").fingerprint_py() != get_test_vocab("mistral-v3").fingerprint_py()


@pytest.mark.parametrize("name", TEST_VOCABS)
def test_compiled_table_and_trie(name):
    from ctalign import _core
    if not hasattr(_core, "TokenTable"):
        pytest.skip("ctalign._core.TokenTable not built yet")
    v = get_test_vocab(name)
    assert v.fingerprint == v.fingerprint_py()
    assert v.table is v.table and v.table.fingerprint == v.fingerprint
    if hasattr(_core, "SequenceTrie"):
        assert v.trie is v.trie
        assert v.trie.n_members == int(np.count_nonzero(v.byte_table()[2]))


@pytest.mark.parametrize("name", ["gpt2", "llama3", "deepseek-v3", "cl100k", "qwen", "tekken", "mistral-v1"])
def test_merge_table_agrees_with_encode_raw_on_invalid_utf8(name):
    """The compiled BPE (ctalign._core.MergeTable) and the tokenizer library's own BPE over raw
    bytes give the same tokens for pieces that are not valid UTF-8."""
    from ctalign import _core
    if not hasattr(_core, "MergeTable"):
        pytest.skip("ctalign._core.MergeTable not built yet")
    v = get_test_vocab(name)
    pieces, _ = _pieces_with_ids(v)
    bad = _invalid_utf8(pieces)[:2000] if v.kind != "sentencepiece_bpe" else [bytes([b]) for b in range(128, 256)]
    bad += [b"\xe4\xb8\xad\xe6", b"\xc3"]
    offsets, ids = v.merge_table.encode_many(bad)
    assert [ids[offsets[k]:offsets[k + 1]].tolist() for k in range(len(bad))] == v.encode_raw(bad)
    assert get_test_vocab("bert-uncased").merge_table is None


# ---- bad input --------------------------------------------------------------------------------------
def _assert_clean_error(exc_info, *needles):
    e = exc_info.value
    assert isinstance(e, ValueError) and isinstance(e, VocabError)
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    for n in needles:
        assert str(n) in str(e), (n, str(e))


def test_bad_input_errors(tmp_path):
    with pytest.raises(VocabError) as ei:
        load_vocab(tmp_path / "missing.json")
    _assert_clean_error(ei, "missing.json", "no such file")
    with pytest.raises(VocabError) as ei:
        load_vocab(tmp_path)
    _assert_clean_error(ei, str(tmp_path), "no tokenizer found")

    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(200, 256)) * 20)
    with pytest.raises(VocabError) as ei:
        load_vocab(junk)
    _assert_clean_error(ei, "junk.bin", "unknown tokenizer format")

    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    with pytest.raises(VocabError) as ei:
        load_vocab(empty)
    _assert_clean_error(ei, "empty.json", "empty")

    truncated = tmp_path / "tokenizer.json"
    truncated.write_bytes(vocab_spec("bert-uncased").read_bytes()[:5000])
    with pytest.raises(VocabError) as ei:
        load_vocab(truncated)
    _assert_clean_error(ei, "tokenizer.json", "not valid JSON", "line")

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(VocabError) as ei:
        load_vocab(other)
    _assert_clean_error(ei, "other.json", "not a tokenizer")

    broken = tmp_path / "broken" / "tokenizer.json"
    broken.parent.mkdir()
    data = json.loads(vocab_spec("bert-uncased").read_text(encoding="utf-8"))
    data["model"]["type"] = "Mystery"
    broken.write_text(json.dumps(data))
    with pytest.raises(VocabError) as ei:
        load_vocab(broken)
    _assert_clean_error(ei, "tokenizer.json", "Mystery")
    del data["model"]["vocab"]
    data["model"]["type"] = "WordPiece"
    broken.write_text(json.dumps(data))
    with pytest.raises(VocabError) as ei:
        load_vocab(broken)
    _assert_clean_error(ei, "tokenizer.json", "malformed")

    model = tmp_path / "cut.model"
    model.write_bytes(vocab_spec("mistral-v1").read_bytes()[:3001])
    with pytest.raises(VocabError) as ei:
        load_vocab(model)
    _assert_clean_error(ei, "cut.model")

    unknown = tmp_path / "mystery_base.tiktoken"
    unknown.write_bytes(b"".join(vocab_spec("gpt2-tiktoken").read_bytes().splitlines(keepends=True)[:300]))
    with pytest.raises(VocabError) as ei:
        load_vocab(unknown)
    _assert_clean_error(ei, "mystery_base", "unknown tiktoken encoding", "pattern=")
    with pytest.raises(VocabError) as ei:
        load_vocab(unknown, encoding="nope")
    _assert_clean_error(ei, "nope")

    bad_line = tmp_path / "cl100k_base.tiktoken"
    bad_line.write_bytes(b"IQ== 0\nthis is not a rank line\n")
    with pytest.raises(VocabError) as ei:
        load_vocab(bad_line)
    _assert_clean_error(ei, "cl100k_base.tiktoken", "line 2")

    tekken = tmp_path / "tekken_bad.json"
    tekken.write_text(json.dumps({"config": {"pattern": "x"}, "vocab": []}))
    with pytest.raises(VocabError) as ei:
        load_vocab(tekken)
    _assert_clean_error(ei, "tekken_bad.json", "Tekken")

    lonely = tmp_path / "lonely" / "encoder.json"
    lonely.parent.mkdir()
    lonely.write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(VocabError) as ei:
        load_vocab(lonely)
    _assert_clean_error(ei, "encoder.json", "merges")

    with pytest.raises(TypeError):
        load_vocab(12345)


# ---- random text ----------------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=80)


@pytest.mark.parametrize("name", ["llama3", "cl100k", "mistral-v1", "tekken", "gpt2", "qwen"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_text)
def test_round_trip_random_text(name, text):
    assert_round_trip(get_test_vocab(name), text)


@pytest.mark.parametrize("name", ["deepseek-v3", "cl100k", "mistral-v3"])
@settings(max_examples=25, deadline=None)
@given(pieces=st.lists(st.binary(max_size=12), max_size=8))
def test_encode_raw_random_bytes(name, pieces):
    v = get_test_vocab(name)
    out = v.encode_raw(pieces)
    assert [v.decode_bytes(r) for r in out] == pieces
