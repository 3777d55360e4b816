"""Loader validation at the boundary (issue #21): every malformed tokenizer file gives one
``VocabError`` naming the file and the problem, before any library is built or any table is sized
from it; never a crash, a Rust panic, a 17 GB table, an ``OverflowError`` / ``RecursionError`` /
``TypeError``, nor a vocabulary that differs from what the tokenizer library does.

Each file is loaded in a child process under a memory and time limit (the old code segfaulted,
panicked or allocated 17 GB on some of them), which loads, encodes and builds the merge table.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from ctalign.errors import VocabError
from ctalign.vocab import load_vocab
try:
    v = load_vocab(sys.argv[1])
    v.encode("abc ab"); v.encode_raw([b"ab", b"abc"] * 200)
    v.merge_table
    print("OK", len(v))
except VocabError as e:
    print("VocabError", e)
except BaseException as e:
    print("OTHER", type(e).__name__, str(e)[:200])
"""


def load_in_child(path: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "RUST_BACKTRACE": "0"})
    return r.returncode, (r.stdout.strip().splitlines() or [""])[-1]


def _bpe(vocab=None, merges=None, added=(), **model):
    m = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
         "vocab": vocab if vocab is not None else {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4},
         "merges": merges if merges is not None else ["a b", "ab c"]}
    m.update(model)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": list(added),
            "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None, "model": m}


def _unigram(vocab):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None,
            "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": False}}


def _added(i, content, special=False):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


HF_CASES = {
    # crashes: a segfault (very long Unigram piece), Rust panics (merge result missing, a
    # continuing_subword_prefix the right part lacks)
    "unigram_very_long_piece": (_unigram([["<unk>", 0.0], ["a", -1.0], ["x" * 200_000, -2.0]]), "bytes long"),
    "merge_result_missing": (_bpe(merges=["a c"]), "result 'ac' is not in the vocabulary"),
    "continuing_prefix_missing": (_bpe(continuing_subword_prefix="##"), "lacks the continuing_subword_prefix"),
    # memory: one id near 2^31 in a tiny file
    "id_near_2_31": (_bpe(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 2**31 - 2}), "out of range"),
    "id_overflow": (_bpe(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 2**40}), "out of range"),
    "added_id_overflow": (_bpe(added=[_added(2**63, "<s>", True)]), "out of range"),
    # silent wrong results: duplicated ids and merges, shifted added-token ids
    "duplicate_id": (_bpe(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 3}), "share id 3"),
    "duplicate_merge": (_bpe(merges=["a b", "ab c", "a b"]), "repeats merge 0"),
    "shifted_added_token": (_bpe(added=[_added(1, "zz")]), "which the model gives to 'b'"),
    # the library gives added tokens its own ids when the model's ids leave a gap before them
    "added_id_after_a_gap": (_bpe(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 5}, added=[_added(6, "<s>", True)]),
                             "tokenizers library gives it id"),
    "bool_id": (_bpe(vocab={"a": 0, "b": True, "c": 2, "ab": 3, "abc": 4}), "ids must be non-negative integers"),
    # unclear errors: invalid UTF-8 (a lone surrogate), a Unigram entry of the wrong shape
    "lone_surrogate": (_bpe(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "\udc80": 5}), "not valid UTF-8"),
    "unigram_bad_entry": (_unigram([["<unk>", 0.0], ["a", "high"]]), "Unigram entry 1"),
    "unigram_negative_unk": (dict(_unigram([["<unk>", 0.0], ["a", -1.0]]), model={
        "type": "Unigram", "unk_id": -1, "vocab": [["<unk>", 0.0], ["a", -1.0]]}), "unk_id"),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_tokenizer_json_defects_are_one_vocab_error(tmp_path, case):
    data, problem = HF_CASES[case]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    rc, line = load_in_child(path)
    assert rc == 0, f"child died with {rc}: {line}"
    assert line.startswith("VocabError") and str(path) in line and problem in line, line


def test_deeply_nested_json_is_a_vocab_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE"}, "normalizer": ' + "[" * 100_000 + "]" * 100_000 + "}")
    rc, line = load_in_child(path)
    assert rc == 0 and line.startswith("VocabError") and "nested too deeply" in line, line


def test_dropout_is_turned_off_not_random(tmp_path):
    """BPE dropout made ``encode`` random; the map is about the canonical tokenization."""
    from tokenizers import Tokenizer

    from ctalign.vocab import load_vocab
    data = _bpe(dropout=0.9)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    v = load_vocab(path)
    plain = Tokenizer.from_str(json.dumps(_bpe()))
    for text in ["abc", "ababc", "cab" * 20]:
        want = plain.encode(text, add_special_tokens=False).ids
        assert all(v.encode(text) == want for _ in range(20))
        assert all(v.encode_raw([text.encode()], fast=False)[0] == want for _ in range(20))
    assert v.details["dropout_ignored"] == 0.9


def test_continuing_subword_prefix_is_handled(tmp_path):
    """A BPE with a continuing_subword_prefix: the merge result is left + right without the prefix."""
    from ctalign.vocab import load_vocab
    data = _bpe(vocab={"a": 0, "##b": 1, "ab": 2, "b": 3, "##c": 4, "abc": 5}, merges=["a ##b", "ab ##c"],
                continuing_subword_prefix="##")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    rc, line = load_in_child(path)
    assert rc == 0 and line.startswith("OK"), line
    v = load_vocab(path)
    assert v.merges == [(0, 1), (2, 4)] and v.token_bytes(1) == b"b"
    assert v.encode("abc") == [5]


def _rank_file(tokens: list[bytes]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens))


_BYTES = [bytes([b]) for b in range(256)]


@pytest.mark.parametrize("case, tokens, problem", [
    ("missing_single_byte", [t for t in _BYTES if t != b"a"] + [b"ab"], "single bytes have no rank (first: 0x61)"),
    ("rank_near_2_31", None, "rank 2147483000 is out of range"),
    ("overlong_token", _BYTES + [b"x" * 100_000], "bytes long"),
])
def test_tiktoken_defects_are_one_vocab_error(tmp_path, case, tokens, problem):
    path = tmp_path / "ranks.tiktoken"
    if tokens is None:
        path.write_bytes(_rank_file(_BYTES) + base64.b64encode(b"ab") + b" 2147483000\n")
    else:
        path.write_bytes(_rank_file(tokens))
    os.rename(path, tmp_path / "cl100k_base.tiktoken")  # a known encoding: its pattern applies
    path = tmp_path / "cl100k_base.tiktoken"
    rc, line = load_in_child(path)
    assert rc == 0, f"child died with {rc}: {line}"
    assert line.startswith("VocabError") and problem in line, line


def _tekken(tokens: list[bytes], n_special=3, specials=None, vocab_size=None):
    return {"config": {"pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+",
                       "default_vocab_size": vocab_size or len(tokens) + n_special,
                       "default_num_special_tokens": n_special, "version": "v3"},
            "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode()} for r, t in enumerate(tokens)],
            "special_tokens": specials if specials is not None else [
                {"rank": k, "token_str": s, "is_control": True} for k, s in enumerate(["<unk>", "<s>", "</s>"])]}


@pytest.mark.parametrize("case, data, problem", [
    ("missing_single_byte", _tekken([t for t in _BYTES if t != b"\x00"] + [b"ab"]), "single bytes have no rank"),
    ("special_rank_negative", _tekken(_BYTES, specials=[{"rank": 0, "token_str": "<unk>"}, {"rank": 1, "token_str": "<s>"},
                                                        {"rank": -1, "token_str": "</s>"}]), "has a rank outside"),
    ("huge_special_count", _tekken(_BYTES, n_special=2**31 - 300, vocab_size=2**31 - 44), "out of range"),
    ("float_rank", dict(_tekken(_BYTES), vocab=[{"rank": r + 0.5 if r == 3 else r, "token_bytes":
                                                base64.b64encode(t).decode()} for r, t in enumerate(_BYTES)]),
     "has rank 3.5"),
])
def test_tekken_defects_are_one_vocab_error(tmp_path, case, data, problem):
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    rc, line = load_in_child(path)
    assert rc == 0, f"child died with {rc}: {line}"
    assert line.startswith("VocabError") and problem in line, line


def test_sentencepiece_invalid_utf8_piece_is_a_vocab_error(tmp_path, load_test_vocab):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from ctalign import assets
    data = assets.path("botchan-bpe").read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    piece = proto.pieces[100].piece.encode()
    at = data.index(b"\n" + bytes([len(piece)]) + piece) + 2  # the piece string field of entry 100's proto
    bad = data[:at] + b"\xff" * len(piece) + data[at + len(piece):]
    path = tmp_path / "bad.model"
    path.write_bytes(bad)
    rc, line = load_in_child(path)
    assert rc == 0 and line.startswith("VocabError") and "not valid UTF-8" in line, line


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_bpe(merges=["a c"])))
    r = subprocess.run([sys.executable, "-m", "ctalign.cli", "build-map", str(path), str(path), "-o",
                        str(tmp_path / "m.ctmap"), "--quiet"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RUST_BACKTRACE": "0"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctalign: error:") and "not in the vocabulary" in lines[0]


# ---- command-line arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, problem", [
    ("qwen", "is not a pre-tokenizer regex"),  # a name where a regex is expected: dec_S was 98% empty
    ("(", "does not compile"),
    (r"\s+|\p{L}+", "is not a pre-tokenizer regex"),
    (r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+", "splits a sample text unlike the qwen encoding"),
])
def test_cli_pattern_must_be_the_tokenizers_split(tmp_path, capsys, pattern, problem):
    from ctalign.cli import main
    rc = main(["build-map", "asset:botchan-bpe", "asset:qwen", "-o", str(tmp_path / "m.ctmap"), "--quiet",
               "--pattern-student", pattern])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and problem in err[0], err
    assert not (tmp_path / "m.ctmap").exists()


def test_cli_pattern_for_a_tokenizer_json_is_an_error(tmp_path, capsys):
    from ctalign.cli import main
    rc = main(["build-map", "asset:botchan-bpe", "asset:bert-uncased", "-o", str(tmp_path / "m.ctmap"), "--quiet",
               "--pattern-student", r"\S+|\s+"])
    err = capsys.readouterr().err
    assert rc == 2 and "tiktoken rank files only" in err, err


def test_cli_map_with_mostly_empty_dec_is_an_error(tmp_path, capsys, monkeypatch):
    """A student that tokenizes most teacher tokens to nothing gives no map (exit 2, nothing written)."""
    from ctalign import cli
    from ctalign.vocab.base import Vocab
    real = Vocab.encode_raw

    def dropping(self, pieces, **kw):
        out = real(self, pieces, **kw)
        return [[] if k % 2 else ids for k, ids in enumerate(out)] if self.name == "botchan-unigram" else out
    monkeypatch.setattr(Vocab, "encode_raw", dropping)
    rc = cli.main(["build-map", "asset:botchan-bpe", "asset:botchan-unigram", "-o", str(tmp_path / "m.ctmap"),
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "empty dec_S" in err, err
    assert not (tmp_path / "m.ctmap").exists()
