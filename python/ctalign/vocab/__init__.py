"""Vocabularies: every tokenizer family mapped into one byte space.

``load_vocab(spec)`` reads a tokenizer file and returns a :class:`Vocab`: for every token id the exact
bytes it stands for (``None`` for special/control tokens), the special tokens with their roles, the
tokenizer's own ``encode``, and ``encode_raw`` (its tokenization of raw byte strings, with no prefix
space and no specials), plus the recorded behaviours that make byte round trips hold (prefix space,
normalizers).

Supported ``spec`` (a path, or an ``(encoder.json, vocab.bpe)`` pair) -> ``kind``, encoder used:

- HF ``tokenizer.json``, or a directory holding one (``tokenizer_config.json`` beside it is read
  for the bos/eos/pad/unk roles) -> byte_bpe | sentencepiece_bpe | unigram | wordpiece, the
  ``tokenizers`` library on the file itself.
- GPT-2 ``encoder.json`` + ``vocab.bpe`` (or ``vocab.json`` + ``merges.txt``; a pair, a directory
  with both, or the encoder with the merges beside it) -> byte_bpe, ``tokenizers`` built from both.
- SentencePiece ``.model`` -> sentencepiece_bpe | unigram, ``sentencepiece`` (its model proto gives
  ``add_dummy_prefix``, byte pieces, control/unknown pieces, the normalizer).
- tiktoken rank file (``*.tiktoken``; Meta's Llama-3 ``tokenizer.model``) -> tiktoken,
  ``tiktoken.Encoding`` built offline; the split pattern and specials of the public encodings are
  known by file name (gpt2/r50k_base, p50k_base, p50k_edit, cl100k_base, o200k_base, qwen,
  whisper multilingual, llama3) or ``encoding=``; other files need ``pattern=``.
- Mistral Tekken ``.json`` -> tekken, ``tiktoken.Encoding``; id = rank + reserved special ids.

Byte mapping per family: GPT-2 byte alphabet (inverse of ``bytes_to_unicode``); SentencePiece
``▁`` -> space and ``<0xNN>`` -> byte NN (ids sharing bytes are all kept); WordPiece ``##x`` -> the
bytes of ``x`` (a continuation: ``word_start`` is False); tiktoken/Tekken raw bytes. Non-special
added tokens keep their literal UTF-8. Special, control and unknown tokens, ids no file defines,
and tokens with empty bytes have no bytes (``None``).

Byte round trip (what the tests check): for any text, the concatenated ``token_bytes`` of
``encode(text)`` equal the UTF-8 of ``normalize(text)``, preceded by one space when ``prefix_space``
applies (HF ByteLevel/Metaspace add it only when the text does not already start with one), except
that WordPiece drops whitespace and maps unknown words to ``[UNK]``, and tokenizers without byte
fallback map unknown characters to ``unk``. A literal U+2581 (``▁``) in a text is a space to every
SentencePiece-style tokenizer.

Costs (measured on 2 pinned cores of an idle machine, best of 3): loading parses the file (0.1-0.35 s for 100k-150k vocabularies); the library
encoders are built lazily on first use (0.05-0.4 s). ``encode_raw`` over a whole vocabulary is one
batched library call: tiktoken/Tekken 0.13-0.3 s (cl100k, Qwen, Tekken), SentencePiece 0.03 s
(32k), HF byte-level BPE 0.5 s (Llama-3, 128k) to 0.8 s (DeepSeek-V3: three regex splits), about
4-6 us per piece inside the ``tokenizers`` library.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ctalign.errors import VocabError
from ctalign.vocab.base import KINDS, ROLES, Vocab, bytes_to_unicode, unicode_to_bytes

__all__ = ["Vocab", "VocabError", "load_vocab", "KINDS", "ROLES", "bytes_to_unicode", "unicode_to_bytes"]


# ---- loading -----------------------------------------------------------------------------------
def _name_for(path: Path) -> str:
    generic = {"tokenizer.json", "tokenizer.model", "encoder.json", "vocab.json", "tekken.json"}
    if path.name in generic and path.parent.name:
        return path.parent.name
    return path.name.split(".")[0] if not path.name.startswith(".") else path.name


def _looks_like_tiktoken(head: bytes) -> bool:
    line = head.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]*=*\s+\d+", line) is not None


def load_vocab(spec: Any, *, pattern: str | None = None, name: str | None = None,
               encoding: str | None = None, specials: dict[str, int] | None = None) -> Vocab:
    """Load a tokenizer's vocabulary from ``spec`` (see the module docstring for formats).

    ``pattern``: the pre-tokenizer regex of a tiktoken rank file that is not a known public
    encoding. ``encoding``: the public encoding a rank file holds when its file name does not say
    (``cl100k_base``, ``o200k_base``, ``qwen``, ``whisper``, ``llama3``, ...). ``specials``: special
    tokens (text -> id) of a rank file loaded with ``pattern``. ``name``: display name.
    A :class:`Vocab` is returned as is. Errors: :class:`VocabError` (a ValueError) naming the
    file and what is wrong.
    """
    if isinstance(spec, Vocab):
        return spec
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise VocabError(f"a vocabulary pair must be (encoder.json, vocab.bpe), got {len(spec)} paths")
        from ctalign.vocab.hf import load_gpt2_pair
        a, b = (Path(os.fspath(p)) for p in spec)
        for p in (a, b):
            if not p.is_file():
                raise VocabError(f"{p}: no such file")
        enc, bpe = (a, b) if a.suffix == ".json" else (b, a)
        return load_gpt2_pair(enc, bpe, name=name or _name_for(enc))
    try:
        path = Path(os.fspath(spec))
    except TypeError:
        raise TypeError(f"load_vocab() takes a path or a Vocab, not {type(spec).__name__}") from None
    if not path.exists():
        raise VocabError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_dir(path, pattern=pattern, name=name, encoding=encoding, specials=specials)
    return _load_file(path, pattern=pattern, name=name, encoding=encoding, specials=specials)


def _load_dir(d: Path, **kw) -> Vocab:
    name = kw.pop("name") or d.name
    for candidate in ("tokenizer.json", "tekken.json"):
        if (d / candidate).is_file():
            return _load_file(d / candidate, name=name, **kw)
    for enc, bpe in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (d / enc).is_file() and (d / bpe).is_file():
            from ctalign.vocab.hf import load_gpt2_pair
            return load_gpt2_pair(d / enc, d / bpe, name=name)
    for pat in ("tokenizer.model", "*.tiktoken", "tekken*.json", "*.model"):
        found = sorted(d.glob(pat))
        if len(found) == 1:
            return _load_file(found[0], name=name, **kw)
    raise VocabError(f"{d}: no tokenizer found in this directory (looked for tokenizer.json, "
                     f"encoder.json + vocab.bpe, vocab.json + merges.txt, tokenizer.model, "
                     f"*.tiktoken, tekken*.json, *.model)")


def _load_file(path: Path, *, pattern=None, name=None, encoding=None, specials=None) -> Vocab:
    name = name or _name_for(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise VocabError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise VocabError(f"{path}: empty file")
    if head[:4] == b"GGUF":
        from ctalign.vocab.gguf_file import load_gguf
        return load_gguf(path, name=name)
    if path.suffix == ".tiktoken" or (pattern is not None or encoding is not None) \
            and _looks_like_tiktoken(head):
        from ctalign.vocab.tiktoken_ranks import load_tiktoken
        return load_tiktoken(path, pattern=pattern, name=name, encoding=encoding, specials=specials)
    if head.lstrip()[:1] in (b"{", b"["):
        from ctalign.vocab.hf import load_json_file
        return load_json_file(path, name=name)
    if _looks_like_tiktoken(head):
        from ctalign.vocab.tiktoken_ranks import load_tiktoken
        return load_tiktoken(path, pattern=pattern, name=name, encoding=encoding, specials=specials)
    if path.suffix in (".bpe", ".txt") and path.name in ("vocab.bpe", "merges.txt"):
        for enc in ("encoder.json", "vocab.json"):
            if (path.parent / enc).is_file():
                from ctalign.vocab.hf import load_gpt2_pair
                return load_gpt2_pair(path.parent / enc, path, name=name)
        raise VocabError(f"{path}: a BPE merge list needs its encoder.json / vocab.json beside it")
    from ctalign.vocab.spm import load_sentencepiece, looks_like_sentencepiece
    if path.suffix == ".model" or looks_like_sentencepiece(head):
        return load_sentencepiece(path, name=name)
    raise VocabError(f"{path}: unknown tokenizer format (not a tokenizer.json, Tekken json, GPT-2 "
                     f"encoder/merges, SentencePiece model or tiktoken rank file)")
