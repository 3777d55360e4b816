"""Fast ``encode_raw`` for HF byte-level BPE: the tokenizer's own pre-tokenizer, then BPE of each
pre-token over its raw bytes with the compiled ``MergeTable``; :class:`FastRawEncoder` (used by
``ctalign.vocab.hf``'s backend when a tokenizer qualifies).
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import numpy as np


def _flatten(node: Any, seq_key: str) -> list[dict]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        out: list[dict] = []
        for child in node.get(seq_key) or []:
            out.extend(_flatten(child, seq_key))
        return out
    return [node]


# ---- fast raw encoding for HF byte-level BPE ----------------------------------------------------
# encode_raw over a whole vocabulary through ``encode_batch`` costs about 6 us per piece (2.7-3.4 s
# over the 507k distinct pieces of the real test assets). The same result, 2.4-2.8x faster, piece by
# piece: the tokenizer's own pre-tokenizer, then BPE of each pre-token over its raw bytes with the
# compiled ``MergeTable`` (HF ``ignore_merges`` included). For the pre-tokenizers known below, a piece
# of certain shapes is provably one pre-token (see each pattern's note), so it skips the
# pre-tokenizer; every other piece goes through ``pre_tokenize_str`` one by one. Tokenizers with other
# pre-tokenizers are left to the library: without the shapes the compiled path gained 0-20%.
# Non-ASCII characters join a shape's character class only when the library's own regex engine
# classifies them so (one batched probe per vocabulary; Unicode tables differ between libraries).
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"  # every ASCII P* or S* character
_CJK_RANGES = ((0x4E00, 0x9FA5), (0x3040, 0x309F), (0x30A0, 0x30FF))
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?"
    "[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)


def _cls(chars: str) -> str:
    return "".join("\\" + c if c in "\\]^-[" else c for c in chars)


_P = _cls(_PUNCT)
_P_NO_QUOTE = _cls(_PUNCT.replace("'", ""))
# name -> (pre-tokenizer steps, whole-piece shapes with {L} / {C} classes, probe base per class).
# Shapes (L = letters as the engine sees them, P = ASCII punctuation, each alternative one match):
#  llama3:   c?L+ (c a space, tab or punctuation other than "'", which could start 's), \d{1,3},
#            " "?P+[\r\n]*, [ \t]+ (\s+(?!\S) at the end), whitespace ending in [\r\n] (\s*[\r\n]+).
#  gpt2:     " "?L+, " "?\d+, " "?P+, any ASCII whitespace run (\s+(?!\S) at the end).
#  deepseek: split 1 (\p{N}{1,3}) and 2 (CJK ranges) leave these whole: " "?L+ with L letters or
#            marks outside the CJK ranges; P[A-Za-z]+; C+ (C: letters/marks inside the ranges);
#            \d{1,3}; " "?P+[\r\n]*; whitespace as llama3.
_KNOWN_PRE_TOKENIZERS = {
    "llama3": (
        (("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False)),
        "[ \t" + _P_NO_QUOTE + "]?[<L>]+|[0-9]{1,3}| ?[" + _P + "]+[\r\n]*|[ \t]+|[ \t\r\n]*[\r\n]",
        {"L": "a"},
    ),
    "gpt2": (
        (("ByteLevel", True),),
        " ?[<L>]+| ?[0-9]+| ?[" + _P + "]+|[ \t\r\n]+",
        {"L": "a"},
    ),
    "deepseek-v3": (
        tuple(("Split", p, "Isolated", False) for p in _DEEPSEEK_SPLITS) + (("ByteLevel", False),),
        " ?[<L>]+|[" + _P + "][A-Za-z]+|[<C>]+|[0-9]{1,3}| ?[" + _P + "]+[\r\n]*|[ \t]+|[ \t\r\n]*[\r\n]",
        {"L": "a", "C": "\u30a2"},
    ),
}


def _steps(pre: Any) -> tuple | None:
    """The pre-tokenizer as a comparable tuple (None when it holds a step the fast path cannot take)."""
    out = []
    for n in _flatten(pre, "pretokenizers"):
        t = n.get("type")
        if t == "Split":
            pat = n.get("pattern") or {}
            out.append(("Split", pat.get("Regex", pat.get("String")), n.get("behavior"), bool(n.get("invert"))))
        elif t == "ByteLevel":
            out.append(("ByteLevel", bool(n.get("use_regex", True))))
        elif t in ("Digits", "Punctuation"):  # split without changing the text
            out.append((t, json.dumps(n, sort_keys=True)))
        else:
            return None
    return tuple(out)


def is_known_pre_tokenizer(steps: tuple) -> bool:
    """Whether ``steps`` (see :func:`_steps`) is a pre-tokenizer of :data:`_KNOWN_PRE_TOKENIZERS`."""
    return any(v[0] == steps for v in _KNOWN_PRE_TOKENIZERS.values())


def _in_cjk(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


class FastRawEncoder:
    """encode_raw_texts for an HF byte-level BPE without normalizer whose pre-tokenizer is known:
    pre-tokenizer + MergeTable."""

    def __init__(self, tokenizer, merge_table, steps: tuple, added: list[str]):
        self._pre_tokenize = tokenizer.pre_tokenizer.pre_tokenize_str
        self._merge_table = merge_table
        known = [v for v in _KNOWN_PRE_TOKENIZERS.values() if v[0] == steps]
        if not known:
            raise ValueError("the fast encode_raw path takes only the pre-tokenizers of _KNOWN_PRE_TOKENIZERS")
        self._known = known[0]
        self._added = _literal_alternation(added) if added else None

    def _whole_shape(self, texts: list[str]):
        """The compiled regex of pieces that are one pre-token, for the characters of ``texts``."""
        _, shape, probes = self._known
        extra = sorted(set("".join([t for t in texts if not t.isascii()])))
        marks = "C" in probes  # deepseek: [\p{L}\p{M}] classes
        likely = [c for c in extra if unicodedata.category(c)[0] in ("LM" if marks else "L")]
        for name, base in probes.items():
            if not marks:
                cands = likely
            else:
                cands = [c for c in likely if _in_cjk(c) == (name == "C")]
            good = self._probe(base, cands)
            chars = ("A-Za-z" if name == "L" else "") + _ranges(good)
            shape = shape.replace(f"[<{name}>]", f"[{chars}]" if chars else "(?!)")
        return re.compile(shape)

    def _probe(self, base: str, chars: list[str]) -> list[str]:
        """The characters x (of a class by Unicode category) that the library's regex engine puts
        in the class too: base + run is one pre-token iff every character of run is (see the
        notes of _KNOWN_PRE_TOKENIZERS). One call when all agree; halves are retried otherwise."""
        if not chars:
            return []
        text = base + "".join(chars)
        got = self._pre_tokenize(text)
        if len(got) == 1 and got[0][1] == (0, len(text)):
            return chars
        if len(chars) == 1:
            return []
        mid = len(chars) // 2
        return self._probe(base, chars[:mid]) + self._probe(base, chars[mid:])

    def encode(self, texts: list[str], slow) -> list[list[int]]:
        """``slow``: the library path, for pieces holding added-token text."""
        to_slow: list[int] = []
        if self._added is not None:
            joined = "\x00".join(texts)
            if self._added.search(joined):
                starts = np.cumsum([0] + [len(t) + 1 for t in texts])
                to_slow = sorted({int(np.searchsorted(starts, m.start(), side="right")) - 1
                                  for m in self._added.finditer(joined)})
        # Every piece whole through the compiled BPE, then the pieces that may split again.
        offsets, ids = self._merge_table.encode_many(list(map(str.encode, texts)))
        ids = ids.tolist()
        offsets = offsets.tolist()
        out = [ids[a:b] for a, b in zip(offsets, offsets[1:])]
        whole = self._whole_shape(texts) if len(texts) > 256 else None
        if whole is not None:
            split = [k for k, m in enumerate(map(whole.fullmatch, texts)) if m is None and texts[k]]
        else:
            split = [k for k, t in enumerate(texts) if t]
        if to_slow:
            skip = set(to_slow)
            split = [k for k in split if k not in skip]
        if split:
            pre = self._pre_tokenize
            parts: list[bytes] = []
            ends = []
            for k in split:
                t = texts[k]
                parts.extend([t[a:b].encode() for _, (a, b) in pre(t)])
                ends.append(len(parts))
            p_off, p_ids = self._merge_table.encode_many(parts)
            p_ids = p_ids.tolist()
            p_off = p_off.tolist()
            start = 0
            for k, e in zip(split, ends):
                out[k] = p_ids[p_off[start]:p_off[e]]
                start = e
        if to_slow:
            for k, ids_k in zip(to_slow, slow([texts[k] for k in to_slow])):
                out[k] = ids_k
        return out


def _ranges(chars: list[str]) -> str:
    """A regex class body for sorted distinct characters, consecutive code points as ranges."""
    out = []
    k = 0
    while k < len(chars):
        j = k
        while j + 1 < len(chars) and ord(chars[j + 1]) == ord(chars[j]) + 1:
            j += 1
        lo, hi = chars[k], chars[j]
        out.append(_cls(lo) if j == k else f"{_cls(lo)}-{_cls(hi)}")
        k = j + 1
    return "".join(out)


def _literal_alternation(words: list[str]) -> re.Pattern:
    """A regex matching any of ``words`` (longest first, so no word hides another)."""
    return re.compile("|".join(map(re.escape, sorted(set(words), key=lambda w: (-len(w), w)))))
