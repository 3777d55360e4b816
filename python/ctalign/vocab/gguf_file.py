"""GGUF vocabularies (llama.cpp, Ollama, LM Studio model files) (see ctalign.vocab).

The file is read with the ``gguf`` package's ``GGUFReader`` (a memory map): only the
``tokenizer.*`` metadata is decoded, tensors are never read or copied. Two tokenizer types are
supported, each encoding as llama.cpp's ``src/llama-vocab.cpp`` does:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. Tokens (GPT-2 byte alphabet), merges and
  the pre-tokenizer named by ``tokenizer.ggml.pre`` become an HF ``tokenizer.json`` description
  (the pre-tokenizer as llama.cpp's sequence of regex splits, each match and each gap a piece,
  then the byte alphabet), loaded by ``ctalign.vocab.hf``: ``encode`` uses the ``tokenizers``
  library, ``encode_raw`` the compiled BPE. The regexes per name are in :data:`PRE_TOKENIZERS`;
  a name that is not there is an error, never a fallback to another regex.
- ``"llama"``: SentencePiece-style vocabulary with scores, encoded by llama.cpp's SPM algorithm
  (:class:`LlamaSPMBackend`): text split at user-defined pieces, a space before the first
  fragment (and after each user-defined piece) when ``tokenizer.ggml.add_space_prefix``
  (default true), spaces as ``▁``, then the adjacent pair whose concatenation is a token with
  the highest score merged first (ties: leftmost), characters left without a token as their
  ``<0xNN>`` byte pieces.

Token types: 1 normal, 2 unknown, 3 control, 4 user-defined (stored with literal spaces, its
bytes are its text), 5 unused, 6 byte (``<0xNN>``). Unknown, control and unused tokens are
specials (no bytes); roles come from ``tokenizer.ggml.{eos,bos,unknown,padding}_token_id``.
Other tokenizer types (``bert``, ``t5``, ``rwkv``, ``gemma4``, ...) and unknown pre-tokenizer
names raise :class:`~ctalign.errors.VocabError` naming the file, the type and what is supported;
so does a file the reader cannot parse (truncated, corrupt).
"""
from __future__ import annotations

import heapq
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from ctalign.errors import VocabError
from ctalign.vocab.base import Backend, Vocab, assign_roles

__all__ = ["load_gguf", "looks_like_gguf", "PRE_TOKENIZERS", "SUPPORTED_MODELS"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SUPPORTED_MODELS = ("gpt2", "llama")
_SPACE_MARK = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def looks_like_gguf(head: bytes) -> bool:
    return head[:4] == b"GGUF"


# ---- pre-tokenizers ---------------------------------------------------------------------------
# Written from the regex lists of llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp, the copy
# vendored by llama-cpp-python 0.3.36), grouped the way its pre-type switch groups the names.
# Each regex splits every piece left by the previous one; matches and the text between them are
# both kept (HF Split "Isolated"). The contraction alternatives are spelt with explicit case
# classes, as llama.cpp spells them, not (?i:...).
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_LLAMA3 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
           "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
          "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN35 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*"
           "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-"
    "\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90"
    "-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-"
    "\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d"
    "\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK3_MAIN = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                   "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")
_GPT4O = (
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    "|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_BLOOM = " ?[^(\\s|.,!?…。，、।۔،)]+"

# group -> (regexes, llama.cpp's ignore_merges for the group's names, names)
_GROUPS: dict[str, tuple[tuple[str, ...], dict[str, bool]]] = {
    "default": ((
        "[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2, "\\p{N}+", "[0-9][0-9][0-9]"),
        {"default": False}),
    "llama3": ((_LLAMA3,), {n: True for n in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "jina-v5-nano")}),
    "dbrx": ((_LLAMA3,), {"dbrx": False, "smaug-bpe": False}),
    "chatglm4": ((_LLAMA3,), {"chatglm-bpe": False, "glm4": True, "glm5": True}),
    "deepseek-llm": ((
        "[\r\n]", "\\s?[" + _DEEPSEEK_LLM_LETTERS + "]+", "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$",
        "[一-龥ࠀ-一가-퟿]+", "\\p{N}+"),
        {"deepseek-llm": False}),
    "deepseek-v3": (("\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3_MAIN),
                    {n: False for n in ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4")}),
    "deepseek-coder": (("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"),
                       {"deepseek-coder": False}),
    "falcon": (("[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2, "[0-9][0-9][0-9]"), {"falcon": False}),
    "starcoder": (("\\p{N}", _GPT2), {n: False for n in (
        "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2")}),
    "gpt2": ((_GPT2,), {n: False for n in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
        "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling",
        "jina-v1-en", "jina-v2-code", "roberta-bpe")}),
    "qwen2": ((_QWEN2,), {n: False for n in (
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open")}),
    "qwen35": ((_QWEN35,), {"qwen35": False}),
    "bloom": ((_BLOOM,), {"poro-chat": False, "bloom": False, "gpt3-finnish": False}),
    "viking": ((_BLOOM, "\\p{N}"), {"viking": False}),
    "gpt-4o": ((_GPT4O,), {n: False for n in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")}),
}

#: ``tokenizer.ggml.pre`` name -> (regex splits in order, ignore_merges), as llama.cpp reads it.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    name: (regexes, ignore) for regexes, names in _GROUPS.values() for name, ignore in names.items()
}


def _pre_tokenizer_json(regexes: tuple[str, ...]) -> dict:
    steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
             for r in regexes]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False})
    return {"type": "Sequence", "pretokenizers": steps}


# ---- reading the file ----------------------------------------------------------------------------
def _read_tokenizer_fields(path: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file: scalars as Python values, arrays as lists."""
    try:
        from gguf import GGUFReader, GGUFValueType
    except ImportError:
        raise VocabError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)") from None

    class _Reader(GGUFReader):
        # The stock reader makes one numpy view per array element (seconds for a 262k-token
        # vocabulary). Arrays are kept here as one byte range each and decoded on demand; the
        # rest of the parsing (header, scalars, tensor infos) is the library's.
        def _get_field_parts(self, orig_offs, raw_type):
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            import numpy as np
            head = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            if len(head) != 1 or len(alen) != 1:
                raise ValueError("array header runs past the end of the file")
            itype, n = GGUFValueType(int(head[0])), int(alen[0])
            start = orig_offs + 12
            size = len(self.data)
            if itype == GGUFValueType.STRING:
                buf = self.data
                offs = []
                pos = start
                for _ in range(n):
                    if pos + 8 > size:
                        raise ValueError("string array runs past the end of the file")
                    slen = int.from_bytes(buf[pos:pos + 8].tobytes(), "little" if self.byte_order == "I" else "big")
                    if slen > size - pos - 8:
                        raise ValueError("string length runs past the end of the file")
                    offs.append((pos + 8, slen))
                    pos += 8 + slen
                self._arrays[int(orig_offs)] = ("str", offs)
                end = pos
            else:
                nptype = self.gguf_scalar_to_np.get(itype)
                if nptype is None:
                    raise ValueError(f"unsupported array element type {itype.name}")
                width = np.dtype(nptype).itemsize
                if n * width > size - start:
                    raise ValueError("array runs past the end of the file")
                self._arrays[int(orig_offs)] = ("num", self._get(start, nptype, n))
                end = start + n * width
            whole = self.data[orig_offs:end]
            return end - orig_offs, [whole], [0], [GGUFValueType.ARRAY, itype]

        def __init__(self, p):
            self._arrays = {}
            super().__init__(p)

    try:
        reader = _Reader(path)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, OSError) as e:
        raise VocabError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    except AttributeError:  # the library's internals changed (written against gguf 0.19): stock reader
        return _read_with_stock_reader(path, GGUFReader, GGUFValueType)
    out: dict[str, Any] = {}
    try:
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer.") or key.startswith("tokenizer.chat_template"):
                continue
            t = field.types[0]
            if t == GGUFValueType.ARRAY:
                kind, arr = reader._arrays[int(field.offset) + _value_offset(field)]
                if kind == "str":
                    data = reader.data
                    out[key] = [bytes(data[a:a + n]).decode("utf-8") for a, n in arr]
                else:
                    out[key] = arr.tolist()
            elif t == GGUFValueType.STRING:
                out[key] = bytes(field.parts[-1]).decode("utf-8")
            else:
                out[key] = field.parts[-1].tolist()[0]
    except UnicodeDecodeError as e:
        raise VocabError(f"{path}: GGUF metadata {key!r} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, KeyError, IndexError) as e:
        raise VocabError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    out["_n_tensors"] = len(reader.tensors)
    del reader
    return out


def _read_with_stock_reader(path: Path, reader_cls, value_type) -> dict[str, Any]:
    try:
        reader = reader_cls(path)
        out: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("tokenizer.") and not key.startswith("tokenizer.chat_template"):
                v = field.contents()
                out[key] = v
        out["_n_tensors"] = len(reader.tensors)
        return out
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, OSError, UnicodeDecodeError) as e:
        raise VocabError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _value_offset(field) -> int:
    # field.parts = [key length, key bytes, value type, <the array's byte range>]
    return int(field.parts[0].nbytes + field.parts[1].nbytes + field.parts[2].nbytes)


# ---- loading ------------------------------------------------------------------------------------
def _supported_text() -> str:
    return (f"supported: tokenizer.ggml.model {' / '.join(repr(m) for m in SUPPORTED_MODELS)}; "
            f"pre-tokenizers {', '.join(sorted(PRE_TOKENIZERS))}")


def load_gguf(path: Path, *, name: str) -> Vocab:
    meta = _read_tokenizer_fields(path)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise VocabError(f"{path}: GGUF file without a tokenizer (no tokenizer.ggml.model)")
    if model not in SUPPORTED_MODELS:
        raise VocabError(f"{path}: GGUF tokenizer type {model!r} is not supported ({_supported_text()})")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise VocabError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = [NORMAL] * n
    if not isinstance(types, list) or len(types) < n:
        raise VocabError(f"{path}: tokenizer.ggml.token_type holds {len(types) if isinstance(types, list) else 'no'} "
                         f"entries for {n} tokens")
    types = [int(t) for t in types[:n]]
    if model == "gpt2":
        return _load_bpe(path, meta, tokens, types, name=name)
    return _load_spm(path, meta, tokens, types, name=name)


def _role_ids(path: Path, meta: dict, n: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    # eos before bos: GPT-2 style files give one <|endoftext|> for both, an end-of-text token.
    for role, key in (("eos", "eos_token_id"), ("bos", "bos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        v = meta.get("tokenizer.ggml." + key)
        if isinstance(v, int) and 0 <= v < n:
            out[role] = [v]
    return out


def _specials(tokens: list[str], types: list[int]) -> dict[int, str]:
    return {i: t for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (UNKNOWN, CONTROL, UNUSED)}


def _load_bpe(path: Path, meta: dict, tokens: list[str], types: list[int], *, name: str) -> Vocab:
    from ctalign.vocab.hf import load_hf_tokenizer
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:
        raise VocabError(f"{path}: GGUF byte-level BPE without tokenizer.ggml.pre (llama.cpp would use its "
                         f"'default' regexes with a degraded-quality warning; ctalign does not guess: "
                         f"{_supported_text()})")
    if pre not in PRE_TOKENIZERS:
        raise VocabError(f"{path}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.model 'gpt2') is not supported "
                         f"({_supported_text()})")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise VocabError(f"{path}: GGUF byte-level BPE without tokenizer.ggml.merges")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab[t] = i
    if len(vocab) != len(tokens):
        raise VocabError(f"{path}: tokenizer.ggml.tokens holds {len(tokens) - len(vocab)} duplicate token texts")
    pairs = []
    for k, m in enumerate(merges):
        pos = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if pos < 0:
            raise VocabError(f"{path}: merge {k} ({m[:40]!r}) is not 'left right'")
        pairs.append([m[:pos], m[pos + 1:]])
    _check_specials_are_not_text(path, tokens, types, pairs)
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (UNKNOWN, CONTROL, UNUSED, USER_DEFINED):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": ty != USER_DEFINED})
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": _pre_tokenizer_json(regexes), "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": pairs},
    }
    v = load_hf_tokenizer(path, json.dumps(data), data, name=name, source=path,
                          config_path=path.with_name(path.name + ".no-tokenizer-config"))
    special_text = dict(v.special_text)
    _set_roles(v, assign_roles(special_text, _role_ids(path, meta, len(tokens))))
    v.details.update(format="gguf", gguf_model="gpt2", pre=pre, n_tensors=meta["_n_tensors"],
                     n_user_defined=sum(t == USER_DEFINED for t in types))
    return v


def _check_specials_are_not_text(path: Path, tokens: list[str], types: list[int], pairs: list[list[str]]) -> None:
    """A token typed unknown, control or unused has no bytes, so byte-level BPE must never make it from
    text: not a single byte's character, not a merge's result (otherwise encodings drop text)."""
    specials = [i for i, ty in enumerate(types) if ty in (UNKNOWN, CONTROL, UNUSED)]
    if not specials:
        return
    from ctalign.vocab.base import bytes_to_unicode
    made = {a + b for a, b in pairs} | set(bytes_to_unicode().values())
    for i in specials:
        if tokens[i] in made:
            raise VocabError(f"{path}: token {i} ({tokens[i][:40]!r}) is typed {_TYPE_NAMES[types[i]]}, which has "
                             f"no bytes, but byte-level BPE makes it from text (a byte or a merge's result): the "
                             f"file's token types do not fit its merges")


_TYPE_NAMES = {UNKNOWN: "unknown", CONTROL: "control", UNUSED: "unused"}


def _set_roles(v: Vocab, roles: dict[int, str]) -> None:
    v.specials = {i: roles.get(i, "other") for i in v.special_text}
    v.special_ids = {}
    for i, role in v.specials.items():
        v.special_ids.setdefault(role, i)


# ---- SentencePiece-style ("llama") --------------------------------------------------------------
class LlamaSPMBackend(Backend):
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm_session) over a GGUF vocabulary."""

    def __init__(self, path: Path, tokens: list[str], scores: list[float], types: list[int], *,
                 add_space_prefix: bool, byte_ids: dict[int, int], unk_id: int | None):
        self._path = path
        self._scores = scores
        self._to_id = {t: i for i, t in enumerate(tokens)}  # every token, as llama.cpp's text_to_token
        self._byte_ids = byte_ids
        self._unk_id = unk_id
        self._add_space_prefix = add_space_prefix
        user = sorted(((t, i) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == USER_DEFINED and t),
                      key=lambda x: (-len(x[0].encode()), x[1]))
        self._user = user
        self._user_re = re.compile("|".join(re.escape(t) for t, _ in user)) if user else None
        self._cache: dict[str, list[int]] = {}

    def _byte_token(self, b: int) -> int:
        i = self._byte_ids.get(b)
        if i is None and b < 0x80:
            i = self._to_id.get(chr(b))
        if i is None:
            i = self._unk_id
        if i is None:
            raise VocabError(f"{self._path}: byte 0x{b:02x} has no byte piece (<0x{b:02X}>) and there is no unk")
        return i

    def _spm(self, text: str) -> list[int]:
        """One fragment, spaces already ``▁``: score-ordered bigram merging over characters."""
        got = self._cache.get(text)
        if got is not None:
            return got
        to_id, scores = self._to_id, self._scores
        sym = list(text)
        n = len(sym)
        nxt = list(range(1, n + 1))
        if n:
            nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, str]] = []
        for i in range(n - 1):
            t = sym[i] + sym[i + 1]
            j = to_id.get(t)
            if j is not None:
                heap.append((-scores[j], i, i + 1, t))
        heapq.heapify(heap)
        while heap:
            _, left, right, t = heapq.heappop(heap)
            if sym[left] is None or sym[right] is None or nxt[left] != right or sym[left] + sym[right] != t:
                continue
            sym[left] = t
            sym[right] = None
            r = nxt[right]
            nxt[left] = r
            if r >= 0:
                prv[r] = left
            p = prv[left]
            if p >= 0:
                t2 = sym[p] + t
                j = to_id.get(t2)
                if j is not None:
                    heapq.heappush(heap, (-scores[j], p, left, t2))
            if r >= 0:
                t2 = t + sym[r]
                j = to_id.get(t2)
                if j is not None:
                    heapq.heappush(heap, (-scores[j], left, r, t2))
        out: list[int] = []
        i = 0 if n else -1
        while i >= 0:
            s = sym[i]
            j = to_id.get(s)
            if j is not None:
                out.append(j)
            else:
                out.extend(self._byte_token(b) for b in s.encode("utf-8", "surrogateescape"))
            i = nxt[i]
        if len(self._cache) < 200_000:
            self._cache[text] = out
        return out

    def _fragments(self, text: str) -> list[tuple[bool, Any]]:
        """(True, text) / (False, user-defined id) in order, as llama.cpp's special-token partition
        with parse_special=false (user-defined pieces only; longest first)."""
        if self._user_re is None or not text:
            return [(True, text)] if text else []
        parts: list[tuple[bool, Any]] = [(True, text)]
        for piece, tid in self._user:
            if piece not in text:
                continue
            new: list[tuple[bool, Any]] = []
            for is_text, frag in parts:
                if not is_text or piece not in frag:
                    new.append((is_text, frag))
                    continue
                chunks = frag.split(piece)
                for k, c in enumerate(chunks):
                    if k:
                        new.append((False, tid))
                    if c:
                        new.append((True, c))
            parts = new
        return parts

    def _encode(self, text: str, prefix: bool) -> list[int]:
        out: list[int] = []
        prev_special = True
        for is_text, frag in self._fragments(text):
            if not is_text:
                out.append(frag)
                prev_special = True
                continue
            if prefix and prev_special:
                frag = " " + frag
            out.extend(self._spm(frag.replace(" ", _SPACE_MARK)))
            prev_special = False
        return out

    def encode_text(self, text: str) -> list[int]:
        return self._encode(text, self._add_space_prefix)

    def encode_raw_texts(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t, False) for t in texts]

    def encode_raw_invalid(self, pieces: list[bytes]) -> list[list[int]]:
        return [self.encode_with_byte_fallback(p) for p in pieces]

    def normalize(self, text: str) -> str:
        return text.replace(_SPACE_MARK, " ")


def _load_spm(path: Path, meta: dict, tokens: list[str], types: list[int], *, name: str) -> Vocab:
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        scores = [0.0] * n
    if not isinstance(scores, list) or len(scores) < n:
        raise VocabError(f"{path}: tokenizer.ggml.scores holds fewer entries than the {n} tokens")
    scores = [float(s) for s in scores[:n]]
    if len(set(tokens)) != n:
        raise VocabError(f"{path}: tokenizer.ggml.tokens holds {n - len(set(tokens))} duplicate token texts")
    pieces: list[bytes | None] = []
    byte_ids: dict[int, int] = {}
    normal: list[tuple[float, int]] = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (UNKNOWN, CONTROL, UNUSED):
            pieces.append(None)
        elif ty == BYTE:
            m = _BYTE_PIECE.fullmatch(t)
            if m is None:
                raise VocabError(f"{path}: byte token {i} ({t!r}) is not <0xNN>")
            b = int(m.group(1), 16)
            pieces.append(bytes([b]))
            byte_ids.setdefault(b, i)
        elif ty == USER_DEFINED:
            pieces.append(t.encode("utf-8"))  # llama.cpp keeps user-defined text as is (literal spaces)
        else:
            pieces.append(t.replace(_SPACE_MARK, " ").encode("utf-8"))
            normal.append((-scores[i], i))
    special_text = _specials(tokens, types)
    explicit = _role_ids(path, meta, n)
    unk_id = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    if unk_id is None and explicit.get("unk") and explicit["unk"][0] in special_text:
        unk_id = explicit["unk"][0]
    roles = assign_roles(special_text, explicit)
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend = LlamaSPMBackend(path, tokens, scores, types, add_space_prefix=bool(add_prefix),
                              byte_ids=byte_ids, unk_id=unk_id)
    return Vocab(name=name, source=str(path), kind="sentencepiece_bpe", pieces=pieces,
                 special_text=special_text, roles=roles, backend=backend, prefix_space=bool(add_prefix),
                 ranks=[i for _, i in sorted(normal)], unk_id=unk_id,
                 details={"format": "gguf", "gguf_model": "llama", "byte_fallback": bool(byte_ids),
                          "add_space_prefix": bool(add_prefix), "n_tensors": meta["_n_tensors"],
                          "n_user_defined": sum(t == USER_DEFINED for t in types)})
