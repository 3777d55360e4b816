"""Real tokenizer files parsed directly (independently of ctalign.vocab) for the core's tests.

Each loader returns a ``RawVocab``: ``tokens[i]`` = bytes of id i (None for special/unused ids) and,
for BPE families, ``merges`` ((left id, right id) in rank order) or ``priority`` (rank per id, -1 for
tokens that are no merge result). Files come from ``ctalign.assets`` (verified, cached).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ctalign import assets


@dataclass
class RawVocab:
    name: str
    tokens: list  # bytes | None per id
    merges: list | None = None  # [(left id, right id)] in rank order
    priority: list | None = None  # int per id, -1 = never a merge result
    pattern: str | None = None  # pre-tokenizer regex
    extra: dict = field(default_factory=dict)

    def table(self):
        from ctalign import _core
        return _core.TokenTable.from_list(self.tokens)

    def merges_array(self):
        return np.asarray(self.merges, dtype=np.int32).reshape(-1, 2)

    def priority_array(self):
        return np.asarray(self.priority, dtype=np.int32)


def gpt2_byte_decoder() -> dict[str, int]:
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                  r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _tiktoken(name: str, pattern: str) -> RawVocab:
    ranked = {}
    for line in assets.path(name).read_bytes().splitlines():
        if line.strip():
            b64, rank = line.split()
            ranked[int(rank)] = base64.b64decode(b64)
    tokens = [ranked.get(i) for i in range(max(ranked) + 1)]
    priority = [i if t is not None else -1 for i, t in enumerate(tokens)]
    return RawVocab(name, tokens, priority=priority, pattern=pattern, extra={"ranks": {v: k for k, v in ranked.items()}})


@lru_cache(maxsize=None)
def cl100k() -> RawVocab:
    return _tiktoken("cl100k", CL100K_PATTERN)


@lru_cache(maxsize=None)
def qwen() -> RawVocab:
    return _tiktoken("qwen", QWEN_PATTERN)


@lru_cache(maxsize=None)
def gpt2_tiktoken() -> RawVocab:
    return _tiktoken("gpt2-tiktoken", GPT2_PATTERN)


@lru_cache(maxsize=None)
def gpt2() -> RawVocab:
    """GPT-2 encoder.json + vocab.bpe (id 50256 = <|endoftext|>, special)."""
    decoder = gpt2_byte_decoder()
    encoder = json.loads(assets.path("gpt2-encoder").read_text(encoding="utf-8"))
    tokens: list = [None] * (max(encoder.values()) + 1)
    for s, i in encoder.items():
        tokens[i] = None if s == "<|endoftext|>" else bytes(decoder[c] for c in s)
    merges = []
    for line in assets.path("gpt2-merges").read_text(encoding="utf-8").splitlines()[1:]:
        if line.strip():
            a, b = line.split(" ")
            merges.append((encoder[a], encoder[b]))
    return RawVocab("gpt2", tokens, merges=merges, pattern=GPT2_PATTERN, extra={"encoder": encoder})


def _hf_byte_level(name: str) -> RawVocab:
    decoder = gpt2_byte_decoder()
    j = json.loads(assets.path(name).read_text(encoding="utf-8"))
    vocab = j["model"]["vocab"]
    n = max(max(vocab.values()), max((a["id"] for a in j["added_tokens"]), default=0)) + 1
    tokens: list = [None] * n
    for s, i in vocab.items():
        if all(c in decoder for c in s):
            tokens[i] = bytes(decoder[c] for c in s)
        # else: a special token spelled literally in model.vocab; added_tokens says what it is.
    for a in j["added_tokens"]:
        tokens[a["id"]] = None if a["special"] else a["content"].encode("utf-8")
    merges = []
    for m in j["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        merges.append((vocab[a], vocab[b]))
    return RawVocab(name, tokens, merges=merges, extra={"json": j, "vocab": vocab})


@lru_cache(maxsize=None)
def llama3() -> RawVocab:
    return _hf_byte_level("llama3")


@lru_cache(maxsize=None)
def deepseek() -> RawVocab:
    return _hf_byte_level("deepseek-v3")


def _sentencepiece(name: str) -> RawVocab:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(assets.path(name)))
    tokens: list = []
    normal = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            tokens.append(None)
        elif sp.is_byte(i):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            b = piece.replace("\u2581", " ").encode("utf-8")
            tokens.append(b or None)
            if not sp.is_unused(i) and b:
                normal.append(i)
    # SentencePiece BPE merges the adjacent pair whose concatenation has the highest score.
    order = sorted(normal, key=lambda i: (-sp.get_score(i), i))
    priority = [-1] * len(tokens)
    for r, i in enumerate(order):
        priority[i] = r
    return RawVocab(name, tokens, priority=priority, extra={"sp": sp})


@lru_cache(maxsize=None)
def mistral_v1() -> RawVocab:
    return _sentencepiece("mistral-v1")


@lru_cache(maxsize=None)
def botchan_bpe() -> RawVocab:
    return _sentencepiece("botchan-bpe")


@lru_cache(maxsize=None)
def kyoto_unigram() -> RawVocab:
    return _sentencepiece("kyoto-unigram")


@lru_cache(maxsize=None)
def botchan_text() -> str:
    return assets.path("botchan-text").read_text(encoding="utf-8")


MULTILINGUAL_TEXT = (
    "Hello, world! It's a test: don't   stop—now.\n\tTabs\tand  double  spaces   here.\n\n"
    "def f(x):\n    return x**2 + 12345678 - 0.5e-3  # comment\n"
    "Grüße aus München, ça va? Ñandú. Ελληνικά κείμενα. Русский текст, ещё.\n"
    "中文文本测试，标点符号。日本語のテキスト、カタカナ。한국어 문장입니다.\n"
    "Emoji 😀👍🏽🇫🇷 and ZWJ 👩‍💻; math ∑∫√∞ ≠ ≤; arrows → ← ⇒.\n"
    "Numbers 1 22 333 4444 55555 666666 and 3.14159 and 1,000,000.\n"
    "   leading spaces, trailing spaces   \n\r\nCRLF line\r\nend"
)
