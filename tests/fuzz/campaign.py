"""A seeded fuzz campaign against ctalign's inputs (issue #21).

    python -m tests.fuzz.campaign --formats hf spm tiktoken tekken gguf map ops --n 10000 --seed 1 --jobs 2

For each format a generator mutates a genuine input (structured edits that a hostile or careless
user makes, and raw byte flips / truncations), ctalign reads it, and an oracle judges the result:

- ``hf`` (tokenizer.json: byte-level BPE, Unigram, WordPiece bases), ``spm`` (SentencePiece
  ``.model``), ``tiktoken`` (rank files), ``tekken`` (Mistral json): the reference library loading
  the same bytes (``tokenizers``, ``sentencepiece``, ``tiktoken``); an accepted file must give the
  library's encodings of sample texts and its id -> token table;
- ``gguf`` (llama.cpp vocabularies; tests/fuzz/gguf_trial.py): the ``gguf`` package's stock reader
  and the tokenizers library's GPT-2;
- ``map`` (``.ctmap``): the genuine map; an accepted file must hold the genuine arrays;
- ``ops``: finite logits of random shape, dtype, temperature and spread; the compiled CPU kernels
  against the float64 reference (``ctalign.ops.reference``).

Outcomes: ``ok`` (accepted and right, or refused where the input is bad), ``clear_error`` (a
``CtalignError`` naming the file), ``unclear_error`` (any other exception, or no file named),
``crash`` (the worker died: a signal, an abort, memory), ``hang`` (over the time limit), ``silent_wrong``
(accepted, but different from the oracle). Each trial runs in a worker process under
``resource.setrlimit`` (address space, CPU time) and a wall-clock limit; a dead worker is counted
and replaced. Trials are deterministic in (format, seed, index): ``--replay FORMAT:INDEX`` reruns one
in this process and prints the traceback.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

FORMATS = ("hf", "spm", "tiktoken", "tekken", "gguf", "map", "ops", "ops_extreme", "ops_sparse")
KNOWN_OPEN = ()  # formats with known failures, kept out of the defaults (none since e54d881 fixed ops_extreme)
OUTCOMES = ("ok", "clear_error", "unclear_error", "crash", "hang", "silent_wrong")
BAD = ("unclear_error", "crash", "hang", "silent_wrong")
SAMPLES = ["Hello world! It's 2024.", "naïve café — 日本語 🙂", "  two  spaces\n\ttab\r\n", "abcabc the and",
           "hello, world"]
MEM_LIMIT = 3 << 30
TRIAL_TIMEOUT_S = 30.0


class Refused(Exception):
    """The input is bad and ctalign said so clearly (the trial's expected refusal)."""


# ---- genuine bases ---------------------------------------------------------------------------------
def _gpt2_alphabet():
    from ctalign.vocab.base import bytes_to_unicode
    return bytes_to_unicode()


_WORDS = ["the", "and", "ing", "hello", "world", "abc", "tion", "Hel", "wor", " the", " and", " a", " world",
          "20", "24", "202", "ca", "fé", "日本"]


def base_hf(kind: str) -> dict:
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": None, "post_processor": None, "decoder": None}
    if kind == "bpe":
        alpha = _gpt2_alphabet()
        vocab = {alpha[b]: b for b in range(256)}
        merges, seen = [], set()
        for w in _WORDS:
            s = "".join(alpha[b] for b in w.encode())
            cur = s[0]
            for c in s[1:]:
                if (cur, c) not in seen:
                    seen.add((cur, c))
                    merges.append(f"{cur} {c}")
                    vocab.setdefault(cur + c, len(vocab))
                cur = cur + c
        n = len(vocab)
        doc["added_tokens"] = [{"id": n, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True}]
        doc["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        doc["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        doc["model"] = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                        "vocab": vocab, "merges": merges}
    elif kind == "unigram":
        chars = sorted(set("".join(SAMPLES + _WORDS)) - {" "})
        vocab = [["<unk>", 0.0], ["▁", -2.0]] + [[c, -3.0 - k / 100] for k, c in enumerate(chars)] \
            + [["▁" + w.strip(), -4.0 - k / 10] for k, w in enumerate(_WORDS)]
        doc["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        doc["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        seen = set()
        vocab = [e for e in vocab if not (e[0] in seen or seen.add(e[0]))]
        doc["model"] = {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": False}
    else:  # wordpiece
        chars = sorted(set("".join(SAMPLES + _WORDS).lower()) - {" ", "\n", "\t", "\r"})
        vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2}
        for c in chars:
            vocab.setdefault(c, len(vocab))
            vocab.setdefault("##" + c, len(vocab))
        for w in _WORDS:
            vocab.setdefault(w.strip(), len(vocab))
        doc["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True} for t, i in list(vocab.items())[:3]]
        doc["normalizer"] = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                             "strip_accents": None, "lowercase": True}
        doc["pre_tokenizer"] = {"type": "BertPreTokenizer"}
        doc["model"] = {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                        "max_input_chars_per_word": 100, "vocab": vocab}
    return doc


def base_ranks() -> list[bytes]:
    """Byte-level ranks: the 256 bytes, then the merges of _WORDS (each part ranked before its result)."""
    toks = [bytes([b]) for b in range(256)]
    have = set(toks)
    for w in _WORDS:
        b = w.encode()
        for k in range(2, len(b) + 1):
            if b[:k] not in have:
                have.add(b[:k])
                toks.append(b[:k])
    return toks


def _rank_file(toks: list[bytes]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(toks))


TEKKEN_PATTERN = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def base_tekken() -> dict:
    toks = base_ranks()
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    return {"config": {"pattern": TEKKEN_PATTERN, "default_vocab_size": len(toks) + 8,
                       "default_num_special_tokens": 8, "version": "v3"},
            "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": None}
                      for r, t in enumerate(toks)],
            "special_tokens": [{"rank": k, "token_str": s, "is_control": True} for k, s in enumerate(specials)]}


# ---- mutations ---------------------------------------------------------------------------------------
_EXTREME_INTS = [-1, 2**31 - 1, 2**31, 2**32 + 5, 2**63, -2**63, 10**12, True, 1.5, "7", None, 0]


def _pick(rng: random.Random, xs):
    return xs[rng.randrange(len(xs))]


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    op = rng.randrange(4)
    if op == 0 and data:  # flip bits
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        del data[rng.randrange(len(data) + 1):]
    elif op == 2 and data:  # duplicate or delete a slice
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randint(1, 64))
        if rng.random() < 0.5:
            data[a:a] = data[a:b]
        else:
            del data[a:b]
    else:  # insert random bytes
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


def _long_piece(rng):
    return _pick(rng, ["x" * rng.choice([5000, 20000, 200_000]), "é" * 9000, "\udc80", "", "a b", "\x00"])


def mutate_hf(rng: random.Random, doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    m = doc["model"]
    v = m["vocab"]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(14)
        if op == 0 and isinstance(v, dict):  # an id to an extreme / duplicated value
            k = _pick(rng, list(v))
            v[k] = _pick(rng, _EXTREME_INTS + [_pick(rng, list(v.values()))])
        elif op == 1 and isinstance(v, dict):  # delete a token
            v.pop(_pick(rng, list(v)))
        elif op == 2 and isinstance(v, dict):  # add a strange token
            v[_long_piece(rng)] = rng.choice([len(v), len(v) + rng.randrange(1, 10**6)])
        elif op == 3 and m.get("merges"):
            mg = m["merges"]
            c = rng.randrange(4)
            if c == 0:
                mg.append(_pick(rng, mg))  # duplicated merge
            elif c == 1:
                mg.insert(rng.randrange(len(mg)), f"{_pick(rng, list(v))} {_pick(rng, list(v))}")
            elif c == 2:
                mg[rng.randrange(len(mg))] = _pick(rng, ["a", "a b c", "zz yy", ["a", "b"], 5, ""])
            else:
                rng.shuffle(mg)
        elif op == 4 and m["type"] == "BPE":
            m["dropout"] = _pick(rng, [0.1, 0.5, 1.0, 2.0, -1, "x"])
        elif op == 5 and m["type"] == "BPE":
            m["continuing_subword_prefix"] = _pick(rng, ["##", "Ġ", "", "é"])
        elif op == 6 and m["type"] == "BPE":
            m["end_of_word_suffix"] = _pick(rng, ["</w>", "Ġ"])
        elif op == 7:  # added tokens: shifted ids, duplicates, odd content
            a = {"id": _pick(rng, _EXTREME_INTS[:4] + list(range(0, 300, 37))), "content": _long_piece(rng)
                 if rng.random() < 0.3 else _pick(rng, ["<s>", "zz", "the", "Ġ"]), "single_word": False,
                 "lstrip": False, "rstrip": False, "normalized": rng.random() < 0.5, "special": rng.random() < 0.5}
            doc["added_tokens"].append(a)
        elif op == 8 and m["type"] == "Unigram" and isinstance(v, list) and v:
            e = _pick(rng, v)
            c = rng.randrange(4)
            if c == 0:
                e[0] = _long_piece(rng)
            elif c == 1:
                e[1] = _pick(rng, [float("nan"), 1e308, "x", None, True])
            elif c == 2:
                v.append(list(e))
            else:
                m["unk_id"] = _pick(rng, _EXTREME_INTS)
        elif op == 9:  # a component nested deeply or of an unknown type
            doc[_pick(rng, ["normalizer", "pre_tokenizer", "decoder", "post_processor"])] = _pick(rng, [
                {"type": "Sequence", "normalizers": [{"type": "NFC"}] * 3, "pretokenizers": []},
                {"type": "Nope"}, [1, 2], "x", {"type": "Lowercase"}, {"type": "NFKC"},
                {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated", "invert": False}])
        elif op == 10:
            doc["model"]["type"] = _pick(rng, ["BPE", "Unigram", "WordPiece", "WordLevel", None, 5])
        elif op == 11 and m["type"] == "WordPiece":
            m["continuing_subword_prefix"] = _pick(rng, ["", "#", 5, None])
        elif op == 12:  # nested deeply: the trial writes the text (Python's json cannot build it)
            doc["__deep__"] = rng.choice([200, 3000, 100_000])
        elif op == 13 and isinstance(v, dict) and v:  # two tokens exchange ids
            a, b = rng.sample(list(v), 2)
            v[a], v[b] = v[b], v[a]
        m = doc.get("model") if isinstance(doc.get("model"), dict) else {"type": None, "vocab": {}}
        v = m.get("vocab", {})
        if not isinstance(v, (dict, list)):
            break
    return doc


def mutate_ranks(rng: random.Random, toks: list[bytes]) -> bytes:
    lines = [[base64.b64encode(t), b"%d" % r] for r, t in enumerate(toks)]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        k = rng.randrange(len(lines))
        if op == 0:
            del lines[k]  # a byte or a merge part goes missing
        elif op == 1:
            lines[k][1] = _pick(rng, [b"-1", b"2147483647", b"99999999999999999999", b"x", b"1_0", b"%d" % (k + 1)])
        elif op == 2:
            lines[k][0] = _pick(rng, [b"!!", b"", base64.b64encode(b"x" * 30000), base64.b64encode(toks[0])])
        elif op == 3:
            lines.append([base64.b64encode(bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))),
                          b"%d" % rng.choice([len(lines), len(lines) + 10**6])])
        elif op == 4:
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[a][1], lines[b][1] = lines[b][1], lines[a][1]
        elif op == 5:
            lines[k].append(b"extra")
        elif op == 6:
            rng.shuffle(lines)
        else:
            return mutate_bytes(rng, b"\n".join(b" ".join(x) for x in lines) + b"\n")
    return b"\n".join(b" ".join(x) for x in lines) + b"\n"


def mutate_tekken(rng: random.Random, doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    cfg, vocab, sp = doc["config"], doc["vocab"], doc["special_tokens"]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op == 0:
            del vocab[rng.randrange(len(vocab))]
        elif op == 1:
            _pick(rng, vocab)["rank"] = _pick(rng, _EXTREME_INTS)
        elif op == 2:
            _pick(rng, vocab)["token_bytes"] = _pick(rng, ["!!", "", base64.b64encode(b"x" * 30000).decode(), None])
        elif op == 3:
            cfg[_pick(rng, ["default_vocab_size", "default_num_special_tokens"])] = _pick(rng, _EXTREME_INTS)
        elif op == 4 and sp:
            _pick(rng, sp)["rank"] = _pick(rng, _EXTREME_INTS)
        elif op == 5:
            cfg["pattern"] = _pick(rng, ["(", "qwen", 5, r"\s+"])
        elif op == 6:
            doc.pop(_pick(rng, ["special_tokens", "vocab", "config"]), None)
            break
        else:
            vocab.append(dict(_pick(rng, vocab)))
    return doc


# ---- trials ------------------------------------------------------------------------------------------
def _clear(e: BaseException, path) -> bool:
    from ctalign.errors import CtalignError
    return isinstance(e, CtalignError) and (path is None or str(path) in str(e)) and len(str(e)) > len(str(path)) + 5


def _load(path, **kw):
    from ctalign.vocab import load_vocab
    return load_vocab(path, **kw)


def _gpt2_bytes_of(token: str) -> bytes:
    from ctalign.vocab.base import gpt2_token_bytes
    return gpt2_token_bytes(token)


def _check_hf(path: Path, text: str, v) -> str:
    """An accepted tokenizer.json against the tokenizers library on the same bytes."""
    from tokenizers import Tokenizer
    doc = json.loads(text)
    m = doc["model"]
    if m.get("dropout"):
        m["dropout"] = None  # ctalign maps the canonical tokenization; compare with the library's
    lib = Tokenizer.from_str(json.dumps(doc))
    lib.encode_special_tokens = True
    for s in SAMPLES:
        got = v.encode(s)
        want = lib.encode(s, add_special_tokens=False).ids
        if got != want:
            return f"encode({s!r}): {got} != library {want}"
    byte_level = v.kind == "byte_bpe"
    size = lib.get_vocab_size(with_added_tokens=True)
    for i in range(min(len(v), size)):
        tok = lib.id_to_token(i)
        b = v.token_bytes(i)
        if tok is None or b is None:
            continue
        want = _gpt2_bytes_of(tok) if byte_level else tok.replace("▁", " ").encode()
        wp = (m.get("continuing_subword_prefix") or "##") if v.kind == "wordpiece" else None
        if wp and tok.startswith(wp) and len(tok) > len(wp):
            want = tok[len(wp):].encode()
        cont = m.get("continuing_subword_prefix") if m.get("type") == "BPE" else None
        if cont and tok.startswith(cont) and len(tok) > len(cont):
            want = want[len(cont.encode()):]
        eow = m.get("end_of_word_suffix") if m.get("type") == "BPE" else None
        if eow and tok.endswith(eow) and len(tok) > len(eow):
            want = want[:len(want) - len(eow.encode())]
        if b != want and not (b.startswith(b"<0x") or len(b) == 1):
            return f"token {i}: bytes {b!r}, library token {tok!r}"
    return ""


def trial_hf(rng, workdir: Path) -> tuple[str, str]:
    doc = mutate_hf(rng, base_hf(_pick(rng, ["bpe", "bpe", "unigram", "wordpiece"])))
    deep = doc.pop("__deep__", None)
    text = json.dumps(doc)
    if deep:
        text = text[:-1] + ', "normalizer": ' + '{"type": "Sequence", "normalizers": [' * deep + "]}" * deep + "}"
    raw = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.2:
        raw = mutate_bytes(rng, raw)
    path = workdir / "tokenizer.json"
    path.write_bytes(raw)
    try:
        v = _load(path)
        v.encode_raw([s.encode() for s in SAMPLES] * 60)
        v.merge_table
    except BaseException as e:  # noqa: BLE001
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        return ("clear_error" if _clear(e, path) else "unclear_error"), f"{type(e).__name__}: {str(e)[:160]}"
    try:
        problem = _check_hf(path, raw.decode("utf-8"), v)
    except Exception as e:  # the library refuses what ctalign accepted
        return "silent_wrong", f"accepted, but the library cannot use it: {type(e).__name__}: {str(e)[:120]}"
    return ("silent_wrong", problem) if problem else ("ok", "")


def trial_spm(rng, workdir: Path) -> tuple[str, str]:
    from ctalign import assets
    from sentencepiece import sentencepiece_model_pb2 as pb
    base = assets.path(_pick(rng, ["botchan-bpe", "botchan-unigram"])).read_bytes()
    if rng.random() < 0.5:
        data = mutate_bytes(rng, base)
    else:
        proto = pb.ModelProto()
        proto.ParseFromString(base)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(7)
            p = proto.pieces[rng.randrange(len(proto.pieces))]
            if op == 0:
                p.piece = _pick(rng, ["x" * rng.choice([100, 20000, 200_000]), "", "<0xZZ>", "<0x+1>", "▁the"])
            elif op == 1:
                p.type = rng.randint(1, 6)
            elif op == 2:
                p.score = _pick(rng, [float("nan"), float("inf"), -1e30])
            elif op == 3:
                n = proto.pieces.add()
                n.CopyFrom(p)
            elif op == 4:
                setattr(proto.trainer_spec, _pick(rng, ["unk_id", "bos_id", "eos_id", "pad_id"]),
                        _pick(rng, [-5, 2**30, 0, 1, 999]))
            elif op == 5:
                proto.trainer_spec.model_type = rng.randint(1, 4)
            else:
                proto.normalizer_spec.name = _pick(rng, ["nfkc", "identity", "bogus"])
        data = proto.SerializeToString()
    path = workdir / "m.model"
    path.write_bytes(data)
    try:
        v = _load(path)
        v.encode_raw([s.encode() for s in SAMPLES])
    except Exception as e:  # noqa: BLE001
        return ("clear_error" if _clear(e, path) else "unclear_error"), f"{type(e).__name__}: {str(e)[:160]}"
    import sentencepiece as spm
    try:
        lib = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        return "silent_wrong", f"accepted, but sentencepiece cannot load it: {str(e)[:120]}"
    for s in SAMPLES:
        got, want = v.encode(s), lib.encode(s, out_type=int)
        if got != want:
            return "silent_wrong", f"encode({s!r}): {got} != library {want}"
    if len(v) != lib.get_piece_size():
        return "silent_wrong", f"size {len(v)} != library {lib.get_piece_size()}"
    return "ok", ""


def _tiktoken_parse(contents: bytes) -> dict[bytes, int]:
    """tiktoken.load.load_tiktoken_bpe on bytes (its parsing, without its file cache)."""
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines() if line)}


def _tiktoken_oracle(path: Path, v, offset: int, ranks=None) -> str:
    import tiktoken
    from ctalign.vocab.tiktoken_ranks import CL100K_PATTERN
    if ranks is None:  # tiktoken's own loader (it caches by path: read the bytes of this file)
        ranks = _tiktoken_parse(path.read_bytes())
    enc = tiktoken.Encoding("oracle", pat_str=v.details.get("pattern") or CL100K_PATTERN, mergeable_ranks=ranks,
                            special_tokens={})
    for s in SAMPLES:
        got = v.encode(s)
        want = [i + offset for i in enc.encode_ordinary(s)]
        if got != want:
            return f"encode({s!r}): {got} != tiktoken {want}"
    for b, r in ranks.items():
        if b and v.token_bytes(r + offset) != b:
            return f"rank {r}: bytes {v.token_bytes(r + offset)!r} != {b!r}"
    return ""


def trial_tiktoken(rng, workdir: Path) -> tuple[str, str]:
    data = mutate_ranks(rng, base_ranks())
    path = workdir / "ranks.tiktoken"
    path.write_bytes(data)
    try:
        from ctalign.vocab.tiktoken_ranks import CL100K_PATTERN
        v = _load(path, pattern=CL100K_PATTERN, specials={"<|endoftext|>": len(base_ranks())})
        v.encode_raw([s.encode() for s in SAMPLES] + [b"\xff\xfe", b"\x80abc"])
        v.merge_table
    except BaseException as e:  # noqa: BLE001
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        return ("clear_error" if _clear(e, path) else "unclear_error"), f"{type(e).__name__}: {str(e)[:160]}"
    try:
        problem = _tiktoken_oracle(path, v, 0)
    except Exception as e:
        return "silent_wrong", f"accepted, but tiktoken cannot use it: {type(e).__name__}: {str(e)[:120]}"
    return ("silent_wrong", problem) if problem else ("ok", "")


def trial_tekken(rng, workdir: Path) -> tuple[str, str]:
    doc = mutate_tekken(rng, base_tekken())
    raw = json.dumps(doc).encode()
    if rng.random() < 0.15:
        raw = mutate_bytes(rng, raw)
    path = workdir / "tekken.json"
    path.write_bytes(raw)
    try:
        v = _load(path)
        v.encode_raw([s.encode() for s in SAMPLES] + [b"\xff\xfe"])
        v.merge_table
    except BaseException as e:  # noqa: BLE001
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        return ("clear_error" if _clear(e, path) else "unclear_error"), f"{type(e).__name__}: {str(e)[:160]}"
    try:
        d = json.loads(raw)
        n_special = d["config"]["default_num_special_tokens"]
        inner = d["config"]["default_vocab_size"] - n_special
        ranks = {base64.b64decode(e["token_bytes"]): e["rank"] for e in d["vocab"][:inner]}
        problem = _tiktoken_oracle(path, v, n_special, ranks)
        if not problem and len(v) != d["config"]["default_vocab_size"]:
            problem = f"size {len(v)} != default_vocab_size"
    except Exception as e:
        return "silent_wrong", f"accepted, but tiktoken cannot use it: {type(e).__name__}: {str(e)[:120]}"
    return ("silent_wrong", problem) if problem else ("ok", "")


_GENUINE: dict = {}


def _genuine_map():
    if "map" not in _GENUINE:
        from ctalign import assets
        from ctalign.alignment_map import build_map
        _GENUINE["map"] = build_map(str(assets.path("botchan-bpe")), str(assets.path("botchan-unigram")))
    return _GENUINE["map"]


_SUBSET_STATS = {"unroll_mismatch", "first_unroll_mismatch", "subset_exempt", "teacher_unreachable"}
_DESCRIPTIVE = {"name", "kind", "format", "normalizer", "lossy_normalizer", "prefix_space", "byte_fallback"}


def trial_map(rng, workdir: Path) -> tuple[str, str]:
    import numpy as np

    from ctalign.alignment_map import AlignmentMap
    from ctalign.artifact import _encode_artifact
    g = _genuine_map()
    header = json.loads(json.dumps(g._header))
    arrays = g.arrays()
    if rng.random() < 0.25:
        data = mutate_bytes(rng, g.to_bytes())
    else:
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.7:
                name = _pick(rng, sorted(arrays))
                a = arrays[name].copy()
                if a.size == 0:
                    continue
                flat = a.reshape(-1)
                k = rng.randrange(flat.size)
                c = rng.randrange(4)
                if c == 0:
                    flat[k] = flat[rng.randrange(flat.size)]
                elif c == 1:
                    flat[k] = (int(flat[k]) + _pick(rng, [1, -1, 2])) % 256 if flat.dtype.itemsize == 1 \
                        else flat[k] + _pick(rng, [1, -1, 2])
                elif c == 2:
                    j = rng.randrange(flat.size)
                    flat[k], flat[j] = flat[j], flat[k]
                else:
                    a = a[:-1] if a.ndim == 1 and len(a) > 1 else a
                arrays[name] = a
            else:
                side = _pick(rng, ["teacher", "student"])
                key = _pick(rng, ["size", "fingerprint", "with_bytes", "specials", "name", "kind"])
                if rng.random() < 0.3:
                    header["regime"] = _pick(rng, ["subset", "identical", "bogus", 5])
                elif rng.random() < 0.3:
                    st = header["stats"]
                    st[_pick(rng, sorted(st))] = _pick(rng, [0, -1, 10**9, "x", None])
                else:
                    header[side][key] = _pick(rng, [0, -1, 10**12, "x", None, [], [[0, "bos", "x"]], "0" * 64])
        data = _encode_artifact(header, arrays)  # checksum recomputed: only the content can tell
    path = workdir / "m.ctmap"
    path.write_bytes(data)
    try:
        m = AlignmentMap.load(path)
        m.report()
        m.teacher_trie
        m.dec_trie
    except Exception as e:  # noqa: BLE001
        return ("clear_error" if _clear(e, path) else "unclear_error"), f"{type(e).__name__}: {str(e)[:160]}"
    for name, a in g.arrays().items():
        b = m.arrays().get(name)
        if b is None or b.shape != a.shape or not np.array_equal(a, b):
            return "silent_wrong", f"accepted with {name} changed"
    if m._header["regime"] != g._header["regime"]:
        return "silent_wrong", "accepted with header regime changed"
    for key, val in g._header["stats"].items():  # the subset-check counts need the teacher's merges
        if key not in _SUBSET_STATS and m._header["stats"].get(key) != val:
            return "silent_wrong", f"accepted with header stats.{key} changed"
    for side in ("teacher", "student"):
        for k, val in g._header[side].items():
            if k not in _DESCRIPTIVE and m._header[side].get(k) != val:
                return "silent_wrong", f"accepted with header {side}.{k} changed"
    return "ok", ""


def trial_ops(rng, workdir: Path, extreme: bool = False) -> tuple[str, str]:
    """Finite logits of any spread: the compiled CPU kernels against the float64 reference
    (``extreme``: spreads of 1e6-1e30 after the temperature, which the kernels keep finite since the
    shift fix of tests/test_reliability_ops.py)."""
    import torch

    from ctalign.ops import _cpu_backend as cpu
    from ctalign.ops import reference as ref
    g = _genuine_map()
    V = g.n_teacher
    n = rng.randint(1, 5)
    W = V + rng.choice([0, 0, 3, 64])
    dtype = _pick(rng, [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    spread = _pick(rng, [1e6, 1e10, 1e20, 1e30] if extreme else [1.0, 10.0, 100.0, 1e3, 1e4, 3e4])
    if dtype == torch.float16:
        spread = min(spread, 3e4)
    T = _pick(rng, [1.0, 1.0, 0.5, 2.0, 1e-3, 100.0])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    x = (torch.randn(n, W, generator=gen, dtype=torch.float64) * spread)
    shape = rng.randrange(4)
    if shape == 1:  # one huge logit
        x[:, rng.randrange(V)] += spread * 10
    elif shape == 2:  # everything equal
        x[:] = spread
    elif shape == 3:  # a few masked columns
        x[:, rng.sample(range(V), min(V, 10))] = -spread * 50
    x = x.clamp(-6e4, 6e4) if dtype == torch.float16 else x
    x = x.to(dtype)
    if not torch.isfinite(x.to(torch.float64) / T).all():
        return "ok", "skipped: not finite at this temperature"
    x64 = x.to(torch.float64)
    which = rng.randrange(3)
    try:
        if which == 0:
            group = torch.as_tensor(g.first_byte)
            out, lse = cpu.grouped_logmass(x, V, group, 257, T)
            want, _ = ref.grouped_logmass(x64, V, group, 257, T)
        elif which == 1:
            group = torch.as_tensor(g.first_student)
            G = g.n_student + 1
            out, lse = cpu.grouped_logmass(x, V, group, G, T)
            want, _ = ref.grouped_logmass(x64, V, group, G, T)
        else:
            order = torch.as_tensor(g.teacher_order)
            lo = torch.as_tensor(g.cover_lo)[None]
            hi = torch.as_tensor(g.cover_hi)[None]
            out, lse = cpu.range_logmass(x, V, order, None, lo, hi, T)
            want, _ = ref.range_logmass(x64, V, order, None, lo, hi, T)
    except Exception as e:  # noqa: BLE001
        return ("clear_error" if _clear(e, None) else "unclear_error"), f"{type(e).__name__}: {str(e)[:160]}"
    out = out.to(torch.float64)
    if torch.isnan(out).any() or torch.isnan(lse.to(torch.float64)).any():
        return "silent_wrong", f"NaN output (op {which}, dtype {dtype}, spread {spread}, T {T})"
    sig = want > -12
    err = (out - want).abs()[sig]
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    if err.numel() and err.max().item() > tol:
        return "silent_wrong", f"op {which} off by {err.max().item():.3g} (dtype {dtype}, spread {spread}, T {T})"
    if (torch.isinf(out) & (want > -60)).any():
        return "silent_wrong", f"op {which}: -inf where the reference is finite (dtype {dtype}, spread {spread}, T {T})"
    return "ok", ""


def trial_gguf(rng, workdir: Path) -> tuple[str, str]:
    from tests.fuzz.gguf_trial import trial_gguf as trial
    return trial(rng, workdir, mutate_bytes=mutate_bytes, clear=_clear)


def trial_ops_sparse(rng, workdir: Path) -> tuple[str, str]:
    from tests.fuzz.sparse_ops_trial import trial_ops_sparse as trial
    return trial(rng, workdir, genuine_map=_genuine_map, clear=_clear)


TRIALS = {"hf": trial_hf, "spm": trial_spm, "tiktoken": trial_tiktoken, "tekken": trial_tekken, "gguf": trial_gguf,
          "map": trial_map, "ops": trial_ops, "ops_extreme": lambda rng, w: trial_ops(rng, w, extreme=True),
          "ops_sparse": trial_ops_sparse}


def run_trial(fmt: str, seed: int, index: int, workdir: Path) -> tuple[str, str]:
    rng = random.Random(f"{fmt}:{seed}:{index}")
    return TRIALS[fmt](rng, workdir)


# ---- worker and driver ---------------------------------------------------------------------------------
def worker_main() -> None:
    """Reads ``fmt seed index`` lines, answers one JSON line per trial. Runs under rlimits."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    os.environ.setdefault("RUST_BACKTRACE", "0")
    workdir = Path(tempfile.mkdtemp(prefix="ctalign-fuzz-"))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        fmt, seed, index = line.split()
        try:
            outcome, detail = run_trial(fmt, int(seed), int(index), workdir)
        except MemoryError:
            outcome, detail = "crash", "MemoryError (the worker's memory limit)"
        except BaseException as e:  # noqa: BLE001 - an escape from the trial itself
            outcome, detail = "unclear_error", f"escaped: {type(e).__name__}: {str(e)[:160]}"
        sys.stdout.write(json.dumps([outcome, detail]) + "\n")
        sys.stdout.flush()


class Worker:
    def __init__(self):
        root = Path(__file__).resolve().parents[2]
        # the worker imports the same ctalign as this process (installed in CI, the working tree in
        # development) and tests.fuzz from the checkout
        package_parent = str(Path(__import__("ctalign").__file__).resolve().parents[1])
        paths = [package_parent, str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
               "RUST_BACKTRACE": "0", "OMP_NUM_THREADS": "1", "CTALIGN_NUM_THREADS": "1"}
        self.p = subprocess.Popen([sys.executable, "-m", "tests.fuzz.campaign", "--worker"], cwd=root, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  preexec_fn=_child_limits)
        self._readline(120)

    def _readline(self, timeout):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            return None
        return self.p.stdout.readline()

    def run(self, fmt, seed, index, timeout) -> tuple[str, str]:
        self.p.stdin.write(f"{fmt} {seed} {index}\n")
        self.p.stdin.flush()
        line = self._readline(timeout)
        if line is None:
            self.kill()
            return "hang", f"no answer in {timeout:.0f} s"
        if not line:
            rc = self.p.wait()
            return "crash", f"worker died (exit status {rc})"
        return tuple(json.loads(line))

    def kill(self):
        try:
            self.p.kill()
            self.p.wait(5)
        except Exception:
            pass

    def alive(self):
        return self.p.poll() is None


def _child_limits():
    import resource
    os.nice(5)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def campaign(formats, n: int, seed: int, jobs: int = 1, timeout: float = TRIAL_TIMEOUT_S, log=None,
             examples: int = 3) -> dict:
    """Run ``n`` trials per format; returns {format: {outcome: count}} plus examples of bad outcomes."""
    import threading
    counts = {f: Counter() for f in formats}
    bad_examples = {f: [] for f in formats}
    tasks = [(f, i) for f in formats for i in range(n)]
    lock = threading.Lock()
    t0 = time.time()

    def drive():
        w = Worker()
        while True:
            with lock:
                if not tasks:
                    break
                fmt, i = tasks.pop(0)
            outcome, detail = w.run(fmt, seed, i, timeout)
            if not w.alive():
                w.kill()
                w = Worker()
            with lock:
                counts[fmt][outcome] += 1
                if outcome in BAD and len(bad_examples[fmt]) < examples:
                    bad_examples[fmt].append({"index": i, "outcome": outcome, "detail": detail})
                if log is not None:
                    done = sum(sum(c.values()) for c in counts.values())
                    if done % 500 == 0:
                        log(f"[{time.time() - t0:6.0f}s] {done} trials: "
                            + "; ".join(f"{f} {dict(c)}" for f, c in counts.items()))
        w.kill()

    threads = [threading.Thread(target=drive) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seed": seed, "n_per_format": n, "elapsed_s": round(time.time() - t0, 1),
            "counts": {f: {o: counts[f][o] for o in OUTCOMES} for f in formats}, "bad_examples": bad_examples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS + KNOWN_OPEN)
    ap.add_argument("--n", type=int, default=200, help="trials per format")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=TRIAL_TIMEOUT_S)
    ap.add_argument("--json", metavar="PATH", help="write the counts and examples as JSON")
    ap.add_argument("--replay", metavar="FORMAT:INDEX", help="rerun one trial here, with its traceback")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.replay:
        fmt, index = args.replay.split(":")
        try:
            print(run_trial(fmt, args.seed, int(index), Path(tempfile.mkdtemp())))
        except BaseException:
            traceback.print_exc()
        return 0
    res = campaign(args.formats, args.n, args.seed, args.jobs, args.timeout,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    bad = sum(res["counts"][f][o] for f in args.formats for o in BAD)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
