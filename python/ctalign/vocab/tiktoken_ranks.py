"""tiktoken rank files and Mistral Tekken json (see ctalign.vocab).

A rank file holds ``base64(bytes) rank`` lines and nothing else: the split pattern and the special
tokens come from the public encoding the file belongs to, found by its file name (or ``encoding=``),
or from ``pattern=`` (+ ``specials=``). Token id = rank; Tekken: id = rank + the number of reserved
special ids (``default_num_special_tokens``), specials from the file or, for files that predate
that field, Mistral's fixed list followed by ``<SPECIAL_i>`` fillers.

Encoding runs ``tiktoken.Encoding`` built offline from the ranks (``encode_ordinary``: special
token text is ordinary text). Byte strings that are not valid UTF-8 go through the encoding's BPE
over the whole byte string (no regex split).
"""
from __future__ import annotations

import base64
import binascii
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from ctalign.errors import VocabError
from ctalign.vocab.base import (Backend, Vocab, assign_roles, check_all_bytes, check_id_space, check_piece_length,
                                is_int, library_call)

# Split patterns of the public encodings (tiktoken_ext.openai_public, Qwen, Whisper, Meta Llama 3).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
WHISPER_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

_EOT = "<|endoftext|>"
_WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur "
    "hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si "
    "km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln "
    "ha ba jw su").split()  # the 99 languages of the multilingual Whisper models, in id order


def _from(start: int, texts: list[str]) -> dict[str, int]:
    return {t: start + k for k, t in enumerate(texts)}


def _whisper_specials(n_ranks: int) -> dict[str, int]:
    texts = ([_EOT, "<|startoftranscript|>"] + [f"<|{c}|>" for c in _WHISPER_LANGUAGES]
             + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                "<|notimestamps|>"] + [f"<|{k * 0.02:.2f}|>" for k in range(1501)])
    return _from(n_ranks, texts)


def _llama3_specials(n_ranks: int) -> dict[str, int]:
    named = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{k}|>" for k in range(4)] \
        + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    return _from(n_ranks, named + [f"<|reserved_special_token_{k}|>" for k in range(5, 251)])


@dataclass(frozen=True)
class KnownEncoding:
    name: str
    pattern: str
    specials: Callable[[int], dict[str, int]]  # n_ranks -> special text -> id
    n_vocab: int | None = None
    nfc: bool = False
    n_ranks: int | None = None  # expected number of ranks (checked when given)
    aliases: tuple[str, ...] = field(default=())


KNOWN_ENCODINGS = {e.name: e for e in [
    KnownEncoding("gpt2", R50K_PATTERN, lambda n: {_EOT: 50256}, 50257, aliases=("r50k_base", "r50k")),
    KnownEncoding("p50k_base", R50K_PATTERN, lambda n: {_EOT: 50256}, 50281, aliases=("p50k",)),
    KnownEncoding("p50k_edit", R50K_PATTERN, lambda n: {_EOT: 50256, "<|fim_prefix|>": 50281,
                                                        "<|fim_middle|>": 50282, "<|fim_suffix|>": 50283}),
    KnownEncoding("cl100k_base", CL100K_PATTERN, lambda n: {
        _EOT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276}, aliases=("cl100k",)),
    KnownEncoding("o200k_base", O200K_PATTERN, lambda n: {_EOT: 199999, "<|endofprompt|>": 200018},
                  aliases=("o200k",)),
    # Qwen (1, 2, 2.5): one rank file; specials as Qwen's own tiktoken tokenizer defines them.
    KnownEncoding("qwen", QWEN_PATTERN, lambda n: _from(151643, [_EOT, "<|im_start|>", "<|im_end|>"]
                                                         + [f"<|extra_{k}|>" for k in range(205)]),
                  nfc=True),
    KnownEncoding("whisper", WHISPER_PATTERN, _whisper_specials,
                  aliases=("multilingual", "whisper-multilingual", "whisper_multilingual")),
    KnownEncoding("llama3", LLAMA3_PATTERN, _llama3_specials, n_ranks=128000, aliases=("llama-3",)),
]}
_BY_ALIAS = {a: e for e in KNOWN_ENCODINGS.values() for a in (e.name,) + e.aliases}


def known_encoding(key: str) -> KnownEncoding | None:
    return _BY_ALIAS.get(key.lower())


# ---- the encoder -----------------------------------------------------------------------------------
class TiktokenBackend(Backend):
    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int], *, offset: int = 0,
                 nfc: bool = False, path=None):
        self._name = name
        self._path = path if path is not None else name  # errors name the file
        self._pattern = pattern
        self._ranks = ranks
        self._offset = offset
        self._nfc = nfc

    @cached_property
    def encoding(self):
        import tiktoken
        # e.g. a pattern tiktoken's regex engine rejects (a Rust panic included)
        return library_call(self._path, "tiktoken cannot build this encoding", tiktoken.Encoding, self._name,
                            pat_str=self._pattern, mergeable_ranks=self._ranks, special_tokens={})

    def _shift(self, ids: list[int]) -> list[int]:
        o = self._offset
        return [i + o for i in ids] if o else ids

    def encode_text(self, text: str) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        return self._shift(library_call(self._path, "tiktoken failed to encode", self.encoding.encode_ordinary, text))

    def encode_raw_texts(self, texts: list[str]) -> list[list[int]]:
        enc = self.encoding
        core = getattr(enc, "_core_bpe", None)
        f = core.encode_ordinary if core is not None else enc.encode_ordinary
        if self._nfc:
            texts = [unicodedata.normalize("NFC", t) for t in texts]
        out = library_call(self._path, "tiktoken failed to encode", lambda: [f(t) for t in texts])
        if self._offset:
            o = self._offset
            out = [[i + o for i in ids] for ids in out]
        return out

    @property
    def canonical_normalizer(self) -> bool:
        return self._nfc

    def encode_raw_texts_unnormalized(self, texts: list[str]) -> list[list[int]]:
        enc = self.encoding
        core = getattr(enc, "_core_bpe", None)
        f = core.encode_ordinary if core is not None else enc.encode_ordinary
        o = self._offset
        return library_call(self._path, "tiktoken failed to encode",
                            lambda: [[i + o for i in f(t)] if o else f(t) for t in texts])

    def encode_raw_invalid(self, pieces: list[bytes]) -> list[list[int]]:
        enc = self.encoding
        core = getattr(enc, "_core_bpe", None)
        single = getattr(core, "encode_single_piece", None)
        if single is None:  # tiktoken without the private entry point: same BPE in Python
            return [self._shift(bpe_by_ranks(p, self._ranks)) for p in pieces]
        return library_call(self._path, "tiktoken failed to encode",
                            lambda: [self._shift(single(p)) for p in pieces])

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self._nfc else text


def bpe_by_ranks(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's BPE over one byte string: merge the adjacent pair of lowest rank until none."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = None, -1
        for k in range(len(parts) - 1):
            r = ranks.get(parts[k] + parts[k + 1])
            if r is not None and (best is None or r < best):
                best, at = r, k
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return [ranks[p] for p in parts]


# ---- a given split pattern ------------------------------------------------------------------------
# Words, digits, punctuation, whitespace runs, newlines and several scripts: any split regex of a
# byte-level tokenizer covers all of it (tiktoken drops the text no match covers).
PATTERN_SAMPLE = ("Hello world! It's 2024: we're testing 12345 tokens,\n\tindented  twice   and more...\r\n"
                  "naïve café — Ünïcödé; 日本語のテキスト; Привет мир; مرحبا; 🙂👍🏽 x+y=z <|endoftext|>  ")


def check_pattern(path, pattern: str, known: KnownEncoding | None = None) -> None:
    """A ``pattern=`` given for a rank file must be a split regex: it compiles in tiktoken's regex
    engine, its matches cover every character of :data:`PATTERN_SAMPLE` (``pattern="qwen"`` matches
    almost nothing, and the map it gave had dec_S 98% empty), and for a known encoding it splits the
    sample as that encoding's own pattern does."""
    import tiktoken
    if not isinstance(pattern, str) or not pattern:
        raise VocabError(f"{path}: the split pattern must be a non-empty regex string, not {pattern!r}")
    enc = library_call(path, f"split pattern {pattern[:60]!r} does not compile", tiktoken.Encoding, "pattern-check",
                       pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    covered = bytes(library_call(path, f"split pattern {pattern[:60]!r} fails on a sample text",
                                 enc.encode_ordinary, PATTERN_SAMPLE))
    want = PATTERN_SAMPLE.encode()
    if covered != want:
        raise VocabError(f"{path}: split pattern {pattern[:60]!r} is not a pre-tokenizer regex: its matches cover "
                         f"{len(covered)} of the {len(want)} bytes of a sample text (tiktoken drops the rest); pass "
                         f"the tokenizer's own split regex, or encoding=NAME for a known encoding")
    if known is not None and pattern != known.pattern:
        import regex
        got, ref = regex.findall(pattern, PATTERN_SAMPLE), regex.findall(known.pattern, PATTERN_SAMPLE)
        if got != ref:
            k = next(i for i, (a, b) in enumerate(zip(got + [None], ref + [None])) if a != b)
            raise VocabError(f"{path}: split pattern {pattern[:60]!r} splits a sample text unlike the {known.name} "
                             f"encoding this file holds (piece {k}: {got[k] if k < len(got) else None!r} against "
                             f"{ref[k] if k < len(ref) else None!r})")


# ---- loaders -------------------------------------------------------------------------------------
def _parse_rank_file(path: Path) -> dict[bytes, int]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VocabError(f"{path}: cannot read ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    b64 = base64.b64decode
    for k, line in enumerate(raw.splitlines()):
        parts = line.split()
        if not parts:
            continue
        try:
            token, rank = b64(parts[0]), int(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (binascii.Error, ValueError, IndexError):
            raise VocabError(f"{path}: line {k + 1} is not 'base64-token rank': {line[:60]!r}") from None
        if token in ranks or rank in seen or rank < 0:
            raise VocabError(f"{path}: line {k + 1}: duplicate or negative token/rank")
        check_piece_length(path, f"line {k + 1}'s token", token)
        ranks[token] = rank
        seen.add(rank)
    if not ranks:
        raise VocabError(f"{path}: empty rank file")
    check_id_space(path, max(seen), len(ranks), "rank")
    check_all_bytes(path, ranks)
    return ranks


def _vocab_from_ranks(path: Path, *, name: str, kind: str, ranks: dict[bytes, int], offset: int,
                      specials: dict[str, int], pattern: str, nfc: bool, n_vocab: int | None,
                      details: dict) -> Vocab:
    for t, i in specials.items():
        if not isinstance(t, str) or not t or not is_int(i) or i < 0:
            raise VocabError(f"{path}: special token {t!r} -> {i!r}: expected non-empty text -> non-negative id")
    n = max(max(ranks.values()) + offset, max(specials.values(), default=-1), (n_vocab or 0) - 1)
    n = check_id_space(path, n, len(ranks) + len(specials) + offset)
    pieces: list[bytes | None] = [None] * n
    for b, r in ranks.items():
        pieces[r + offset] = b
    special_text = {i: t for t, i in specials.items()}
    for i, t in special_text.items():
        if pieces[i] is not None:
            raise VocabError(f"{path}: special token {t!r} has id {i}, which is already a token")
    roles = assign_roles(special_text)
    order = [r + offset for b, r in sorted(ranks.items(), key=lambda kv: kv[1]) if b]
    backend = TiktokenBackend(name, pattern, ranks, offset=offset, nfc=nfc, path=path)
    return Vocab(name=name, source=str(path), kind=kind, pieces=pieces, special_text=special_text,
                 roles=roles, backend=backend, prefix_space=False,
                 normalizer="nfc" if nfc else None, lossy_normalizer=None, ranks=order,
                 details={**details, "pattern": pattern})


def load_tiktoken(path: Path, *, pattern: str | None, name: str, encoding: str | None,
                  specials: dict[str, int] | None) -> Vocab:
    stem = path.name.split(".")[0]
    known = known_encoding(encoding) if encoding else None
    if encoding and known is None:
        raise VocabError(f"{path}: unknown tiktoken encoding {encoding!r}; known: "
                         f"{', '.join(sorted(KNOWN_ENCODINGS))}")
    if known is None and pattern is None:
        known = known_encoding(stem)
    if pattern is not None:
        check_pattern(path, pattern, known or known_encoding(stem))
    if known is None and pattern is None and stem != "tokenizer":
        raise VocabError(f"{path}: unknown tiktoken encoding {stem!r}: its split pattern is not in the "
                         f"file; pass pattern=... (and specials=...) or encoding=one of "
                         f"{', '.join(sorted(KNOWN_ENCODINGS))}")
    ranks = _parse_rank_file(path)
    if known is None and pattern is None and len(ranks) == 128000:
        known = KNOWN_ENCODINGS["llama3"]  # Meta's Llama 3 tokenizer.model
    if known is None and pattern is None:
        raise VocabError(f"{path}: unknown tiktoken encoding {stem!r}: its split pattern is not in the "
                         f"file; pass pattern=... (and specials=...) or encoding=one of "
                         f"{', '.join(sorted(KNOWN_ENCODINGS))}")
    if known is not None and known.n_ranks is not None and len(ranks) != known.n_ranks:
        raise VocabError(f"{path}: {len(ranks)} ranks, but the {known.name} encoding has {known.n_ranks}")
    n_ranks = max(ranks.values()) + 1
    spec_map = dict(specials) if specials is not None else (known.specials(n_ranks) if known else {})
    return _vocab_from_ranks(
        path, name=name, kind="tiktoken", ranks=ranks, offset=0, specials=spec_map,
        pattern=pattern or known.pattern, nfc=bool(known and known.nfc and pattern is None),
        n_vocab=known.n_vocab if known else None,
        details={"format": "tiktoken", "encoding": known.name if known and pattern is None else None})


_TEKKEN_DEPRECATED_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]  # Mistral's fixed special tokens for Tekken files without a "special_tokens" list


def load_tekken(path: Path, data: dict, *, name: str) -> Vocab:
    try:
        cfg = data["config"]
        pattern = cfg["pattern"]
        vocab_size = cfg["default_vocab_size"]
        n_special = cfg["default_num_special_tokens"]
        entries = data["vocab"]
        if not isinstance(pattern, str) or not is_int(vocab_size) or not is_int(n_special) or n_special < 0 \
                or not isinstance(entries, list):
            raise VocabError(f"{path}: malformed Tekken config (pattern, default_vocab_size, "
                             f"default_num_special_tokens) or vocab list")
        listed = data.get("special_tokens")
        if listed is not None and not isinstance(listed, list):
            raise VocabError(f"{path}: special_tokens must be a list")
        check_id_space(path, vocab_size - 1, len(entries) + len(listed or _TEKKEN_DEPRECATED_SPECIALS), "vocabulary size")
        inner = vocab_size - n_special
        if inner <= 0 or inner > len(entries):
            raise VocabError(f"{path}: vocabulary size {vocab_size} with {n_special} specials does not fit "
                             f"{len(entries)} ranks")
        ranks: dict[bytes, int] = {}
        for k, e in enumerate(entries[:inner]):
            if not is_int(e["rank"]) or e["rank"] != k:
                raise VocabError(f"{path}: vocab entry {k} has rank {e['rank']!r}")
            token = base64.b64decode(e["token_bytes"], validate=True)
            check_piece_length(path, f"vocab entry {k}", token)
            ranks[token] = k
        if len(ranks) != inner:
            raise VocabError(f"{path}: duplicate token bytes among the first {inner} ranks")
        check_all_bytes(path, ranks)
        if listed is None:
            texts = list(_TEKKEN_DEPRECATED_SPECIALS)
        else:
            texts = [None] * len(listed)
            for s in listed:
                r = s["rank"]
                if not is_int(r) or not 0 <= r < len(listed) or not isinstance(s["token_str"], str) \
                        or texts[r] is not None:
                    raise VocabError(f"{path}: special token {str(s)[:60]} has a rank outside 0..{len(listed) - 1}, "
                                     f"a repeated rank or no text")
                texts[r] = s["token_str"]
        if len(texts) > n_special or any(t is None for t in texts):
            raise VocabError(f"{path}: special tokens do not fill ranks 0..{len(texts) - 1} within {n_special}")
        texts += [f"<SPECIAL_{k}>" for k in range(len(texts), n_special)]
        if len(set(texts)) != n_special:
            raise VocabError(f"{path}: duplicate special tokens")
    except VocabError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, binascii.Error) as e:
        raise VocabError(f"{path}: malformed Tekken file ({type(e).__name__}: {e})") from None
    return _vocab_from_ranks(
        path, name=name, kind="tekken", ranks=ranks, offset=n_special,
        specials={t: k for k, t in enumerate(texts)}, pattern=pattern, nfc=False, n_vocab=vocab_size,
        details={"format": "tekken", "num_special_tokens": n_special, "version": cfg.get("version")})
