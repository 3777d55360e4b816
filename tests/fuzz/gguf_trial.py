"""The ``gguf`` format of the fuzz campaign (tests/fuzz/campaign.py): mutated GGUF vocabularies.

Bases: two genuine llama.cpp vocabularies cut down to a few thousand ids so that a trial stays fast,
consistently (every kept merge's parts and result are kept): ``ggml-vocab-gpt-2`` (``gpt2``, byte-level
BPE) and ``ggml-vocab-llama-spm`` (``llama``, scores and byte pieces). A trial edits the metadata as a
careless or hostile writer would (token texts, types, model and pre-tokenizer names, merges, role ids,
scores, missing keys, wrong value types) and writes it with this module's own GGUF serialiser, or flips,
cuts and forges the bytes of a genuine file (array and string lengths near 2^63).

The oracle:
- the ``gguf`` package's stock ``GGUFReader``, a parser independent of ctalign's: a file it cannot read
  must be refused; of a file it reads, ctalign's id -> bytes table must be the one the stock fields
  give by llama.cpp's rules (types 2/3/5 no bytes; 4 its text; 6 ``<0xNN>``; otherwise the GPT-2
  alphabet or ``▁`` as space);
- encoding: every id in range, and byte-level encodings decode to the text, less the bytes whose
  character is no token (llama.cpp and the library drop them; real files such as SmolLM2's lack some);
- a file whose tokenizer fields are the base's must encode as the base does (the base's encodings are
  checked against llama.cpp's reference tokenisations in tests/test_gguf.py).
"""
from __future__ import annotations

import random
import struct
from functools import lru_cache
from pathlib import Path

SAMPLES = ["Hello world! It's 2024.", "naïve café — 日本語 🙂", "  two  spaces\n\ttab\r\n", "the and then 12345"]
U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10
_KEEP_GPT2 = 2500
_KEEP_SPM = 3000


# ---- a minimal GGUF writer (version 3, metadata only) ---------------------------------------------
def _str(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, v) -> bytes:
    if vtype == STR:
        return _str(v)
    if vtype == ARR:
        itype, items = v
        return struct.pack("<IQ", itype, len(items)) + b"".join(_value(itype, x) for x in items)
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           11: "<q", 12: "<d"}[vtype]
    return struct.pack(fmt, v)


def write_gguf(fields: list[tuple[str, int, object]]) -> bytes:
    """``fields``: (key, value type, value); an array's value is (item type, items)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(fields))]
    for key, vtype, v in fields:
        out += [_str(key), struct.pack("<I", vtype), _value(vtype, v)]
    data = b"".join(out)
    return data + b"\0" * (-len(data) % 32)


# ---- the stock reader, the oracle's parser -------------------------------------------------------
def stock_fields(path: Path) -> dict:
    """The tokenizer.* fields as the gguf package's own reader decodes them."""
    from gguf import GGUFReader, GGUFValueType
    r = GGUFReader(path)
    out = {}
    for key, f in r.fields.items():
        if not key.startswith("tokenizer.") or key.startswith("tokenizer.chat_template"):
            continue
        t = f.types[0]
        if t == GGUFValueType.ARRAY:
            if f.types[-1] == GGUFValueType.STRING:
                out[key] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                out[key] = [f.parts[i].tolist()[0] for i in f.data]
        elif t == GGUFValueType.STRING:
            out[key] = bytes(f.parts[-1]).decode("utf-8")
        else:
            out[key] = f.parts[-1].tolist()[0]
    return out


def expected_pieces(fields: dict) -> list[bytes | None]:
    """llama.cpp's id -> bytes rules over the stock fields."""
    from ctalign.vocab.base import gpt2_token_bytes
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    byte_level = fields["tokenizer.ggml.model"] == "gpt2"
    out = []
    for tok, ty in zip(tokens, types):
        if ty in (2, 3, 5):
            out.append(None)
        elif ty == 4:
            out.append(tok.encode())
        elif ty == 6 and not byte_level:
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            out.append(gpt2_token_bytes(tok) if byte_level else tok.replace("\u2581", " ").encode())
    return [b or None for b in out]  # an empty text is a token without bytes


# ---- the genuine bases ---------------------------------------------------------------------------
@lru_cache(maxsize=None)
def base_fields(kind: str) -> tuple:
    """(key, type, value) of a genuine vocabulary cut to its first ids (the merges among them)."""
    from ctalign import assets
    name = "ggml-vocab-gpt-2" if kind == "gpt2" else "ggml-vocab-llama-spm"
    f = stock_fields(assets.path(name))
    n = _KEEP_GPT2 if kind == "gpt2" else _KEEP_SPM
    tokens, types = f["tokenizer.ggml.tokens"][:n], f["tokenizer.ggml.token_type"][:n]
    fields = [("tokenizer.ggml.model", STR, f["tokenizer.ggml.model"])]
    if kind == "gpt2":
        kept = set(tokens)
        merges = [m for m in f["tokenizer.ggml.merges"]
                  if all(p in kept for p in m.split(" ", 1)) and m.replace(" ", "", 1) in kept]
        tokens, types = tokens + ["<|endoftext|>"], types + [3]
        fields += [("tokenizer.ggml.pre", STR, f["tokenizer.ggml.pre"]),
                   ("tokenizer.ggml.tokens", ARR, (STR, tokens)), ("tokenizer.ggml.token_type", ARR, (I32, types)),
                   ("tokenizer.ggml.merges", ARR, (STR, merges)),
                   ("tokenizer.ggml.bos_token_id", U32, n), ("tokenizer.ggml.eos_token_id", U32, n)]
    else:
        fields += [("tokenizer.ggml.tokens", ARR, (STR, tokens)),
                   ("tokenizer.ggml.scores", ARR, (F32, f["tokenizer.ggml.scores"][:n])),
                   ("tokenizer.ggml.token_type", ARR, (I32, types)),
                   ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
                   ("tokenizer.ggml.unknown_token_id", U32, 0)]
    return tuple(fields)


# ---- mutations -----------------------------------------------------------------------------------
def _pick(rng, xs):
    return xs[rng.randrange(len(xs))]


def mutate_fields(rng: random.Random, fields: list) -> list:
    fields = [(k, t, (v[0], list(v[1])) if t == ARR else v) for k, t, v in fields]
    index = {k: i for i, (k, _, _) in enumerate(fields)}

    def items(key):
        if key not in index or fields[index[key]][1] != ARR:
            return None
        return fields[index[key]][2][1]

    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        tokens = items("tokenizer.ggml.tokens")
        if op == 0 and tokens:
            i = rng.randrange(len(tokens))
            tokens[i] = _pick(rng, [_pick(rng, tokens), "", "x" * rng.choice([300, 70_000]), "\x00", "<0xZZ>",
                                    "\u2581the", "a b", "\udc80", "é"])
        elif op == 1 and items("tokenizer.ggml.token_type"):
            ty = items("tokenizer.ggml.token_type")
            ty[rng.randrange(len(ty))] = rng.randint(-1, 8)
        elif op == 2:
            model = ("tokenizer.ggml.model", STR, _pick(rng, ["bert", "t5", "llama", "gpt2", "", "rwkv"]))
            fields = [f for f in fields if f[0] != model[0]] + [model]
        elif op == 3:
            from ctalign.vocab.gguf_file import PRE_TOKENIZERS
            pre = _pick(rng, sorted(PRE_TOKENIZERS) + ["unknown", "", "gpt-2 "])
            if "tokenizer.ggml.pre" in index:
                fields[index["tokenizer.ggml.pre"]] = ("tokenizer.ggml.pre", STR, pre)
            else:
                fields.append(("tokenizer.ggml.pre", STR, pre))
        elif op == 4 and items("tokenizer.ggml.merges"):
            merges = items("tokenizer.ggml.merges")
            k = rng.randrange(len(merges))
            what = rng.randrange(4)
            if what == 0:
                del merges[k]
            elif what == 1:
                merges.insert(k, _pick(rng, ["zz qq", "nospace", "a  b", " ", merges[k]]))
            elif what == 2:
                j = rng.randrange(len(merges))
                merges[k], merges[j] = merges[j], merges[k]
            else:
                merges.append(merges[k])
        elif op == 5:
            key = _pick(rng, [k for k, _, _ in fields])
            fields = [f for f in fields if f[0] != key]
        elif op == 6:
            key = "tokenizer.ggml." + _pick(rng, ["bos_token_id", "eos_token_id", "unknown_token_id",
                                                   "padding_token_id"])
            fields = [f for f in fields if f[0] != key] + [(key, U32, _pick(rng, [0, 2**31, 2**32 - 1, 5000]))]
        elif op == 7 and items("tokenizer.ggml.scores"):
            sc = items("tokenizer.ggml.scores")
            sc[rng.randrange(len(sc))] = _pick(rng, [float("nan"), float("inf"), -1e30])
        elif op == 8:
            fields.append(("tokenizer.ggml.add_space_prefix", BOOL, rng.random() < 0.5))
        else:  # a field of another type, or an array cut short
            key = _pick(rng, [k for k, _, _ in fields])
            i = [f[0] for f in fields].index(key)
            k, t, v = fields[i]
            fields[i] = (k, U32, 7) if t != U32 else (k, STR, "7")
            if t == ARR and rng.random() < 0.5:
                fields[i] = (k, ARR, (v[0], v[1][: len(v[1]) // 2]))
        index = {k: i for i, (k, _, _) in enumerate(fields)}
    return fields


def forge_lengths(rng: random.Random, data: bytes) -> bytes:
    """An array count or a string length in the file set to a huge or off-by-some value."""
    key = _pick(rng, [b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges", b"tokenizer.ggml.token_type"])
    at = data.find(key)
    if at < 0:
        return data
    count_at = at + len(key) + 8  # value type, item type, then the count
    if rng.random() < 0.5:
        pos = count_at  # the array's count
    else:
        pos = count_at + 8 if key != b"tokenizer.ggml.token_type" else count_at  # its first string's length
    value = _pick(rng, [2**63 - 1, 2**40, 2**32 + 1, 0, 1])
    return data[:pos] + struct.pack("<Q", value) + data[pos + 8:]


# ---- the trial ------------------------------------------------------------------------------------
def trial_gguf(rng: random.Random, workdir: Path, *, mutate_bytes, clear) -> tuple[str, str]:
    from ctalign.vocab import load_vocab
    kind = _pick(rng, ["gpt2", "llama"])
    base = list(base_fields(kind))
    r = rng.random()
    if r < 0.55:
        data = write_gguf(mutate_fields(rng, base))
    elif r < 0.85:
        data = mutate_bytes(rng, write_gguf(base))
    else:
        data = forge_lengths(rng, write_gguf(base))
    path = workdir / "vocab.gguf"
    path.write_bytes(data)
    try:
        v = load_vocab(path)
        encodings = [v.encode(s) for s in SAMPLES]
        v.encode_raw([s.encode() for s in SAMPLES] * 70)
    except Exception as e:  # noqa: BLE001
        return ("clear_error" if clear(e, path) else "unclear_error"), f"{type(e).__name__}: {str(e)[:160]}"
    try:
        fields = stock_fields(path)
        want = expected_pieces(fields)
    except Exception as e:  # noqa: BLE001 - the stock reader refuses what ctalign accepted
        return "silent_wrong", f"accepted, but the gguf reader cannot read it: {type(e).__name__}: {str(e)[:120]}"
    got = v.all_token_bytes()
    if len(got) != len(want):
        return "silent_wrong", f"{len(got)} ids, the file's fields give {len(want)}"
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    if bad:
        i = bad[0]
        return "silent_wrong", f"{len(bad)} ids with other bytes, e.g. {i}: {got[i]!r} != {want[i]!r}"
    for s, ids in zip(SAMPLES, encodings):
        if any(not 0 <= i < len(v) for i in ids):
            return "silent_wrong", f"encode({s!r}) gives ids out of range: {ids}"
        if kind == "gpt2" and fields["tokenizer.ggml.model"] == "gpt2" and v.decode_bytes(ids) != _spellable(s, fields):
            return "silent_wrong", f"encode({s!r}) decodes to {v.decode_bytes(ids)!r}"
    if _plain_gpt2(fields):
        lib = _library_gpt2(fields)
        for s, ids in zip(SAMPLES, encodings):
            want = lib.encode(s, add_special_tokens=False).ids
            if ids != want:
                return "silent_wrong", f"encode({s!r}): {ids} != the tokenizers library's GPT-2 {want}"
    base_stock, base_ids = _base(kind, str(workdir))
    if fields == base_stock and tuple(map(tuple, encodings)) != base_ids:
        return "silent_wrong", "the base's fields, other encodings"
    return "ok", ""


def _spellable(text: str, fields: dict) -> bytes:
    """The bytes of ``text`` that byte-level BPE can spell: llama.cpp (and the library) drop a byte whose
    alphabet character is no token (real files lack some: SmolLM2 has no 0x04, 0xc0, ...)."""
    from ctalign.vocab.base import bytes_to_unicode
    tokens = set(fields["tokenizer.ggml.tokens"])
    alphabet = bytes_to_unicode()
    return bytes(b for b in text.encode() if alphabet[b] in tokens)


def _plain_gpt2(fields: dict) -> bool:
    """GPT-2's own tokenizer: the library's GPT-2 BPE is then an oracle independent of ctalign's."""
    types = fields.get("tokenizer.ggml.token_type") or []
    return (fields.get("tokenizer.ggml.model") == "gpt2" and fields.get("tokenizer.ggml.pre") == "gpt-2"
            and len(types) == len(fields["tokenizer.ggml.tokens"]) and set(types) <= {1, 3}
            and len(set(fields["tokenizer.ggml.tokens"])) == len(types))


def _library_gpt2(fields: dict):
    """The tokenizers library's GPT-2 (its ByteLevel pre-tokenizer regex) over the file's tokens and merges."""
    import json
    from tokenizers import Tokenizer
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    doc = {"version": "1.0", "added_tokens": [{"id": i, "content": t, "special": True, "single_word": False,
                                               "lstrip": False, "rstrip": False, "normalized": False}
                                              for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3],
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                     "merges": fields.get("tokenizer.ggml.merges") or []}}
    lib = Tokenizer.from_str(json.dumps(doc))
    lib.encode_special_tokens = True
    return lib


@lru_cache(maxsize=None)
def _base(kind: str, workdir: str) -> tuple[dict, tuple]:
    """The base's stock fields and its encodings of SAMPLES."""
    from ctalign.vocab import load_vocab
    path = Path(workdir) / f"base-{kind}.gguf"
    path.write_bytes(write_gguf(list(base_fields(kind))))
    v = load_vocab(path)
    return stock_fields(path), tuple(tuple(v.encode(s)) for s in SAMPLES)
