"""The byte space of a vocabulary: :class:`Vocab` and the helpers every loader shares.

A :class:`Vocab` holds, for every token id, the exact bytes it stands for (``None`` for specials),
the specials with their roles, and the tokenizer's own encoders behind a :class:`Backend`. The
loaders (one module per family beside this one) build it; ``ctalign.vocab.load_vocab`` picks the
loader. See ``docs/design.md`` for the byte space and the package docstring for the formats.
"""
from __future__ import annotations

import gc
import hashlib
import os
import re
from functools import cached_property
from itertools import repeat
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ctalign.errors import VocabError

__all__ = ["Vocab", "Backend", "KINDS", "ROLES", "assign_roles", "bytes_to_unicode", "unicode_to_bytes", "gpt2_alphabet", "gpt2_token_bytes"]

_LONE_SURROGATE = re.compile("[\udc80-\udcff]")

KINDS = ("byte_bpe", "sentencepiece_bpe", "unigram", "wordpiece", "tiktoken", "tekken")
ROLES = ("bos", "eos", "pad", "unk", "other")


# ---- GPT-2 byte alphabet ---------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (256 entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


# str.translate table: GPT-2 alphabet character -> the latin-1 character of its byte, so that
# ``s.translate(_GPT2_TO_LATIN1).encode("latin-1")`` decodes a whole token in C.
_GPT2_TO_LATIN1 = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}
_BYTE_TO_GPT2 = bytes_to_unicode()


def gpt2_token_bytes(s: str) -> bytes:
    """Bytes of a GPT-2 alphabet token string; characters outside the alphabet keep their UTF-8."""
    try:
        return s.translate(_GPT2_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(bytes([ord(_GPT2_TO_LATIN1[ord(c)])]) if ord(c) in _GPT2_TO_LATIN1
                        else c.encode("utf-8") for c in s)


def gpt2_alphabet(b: bytes) -> str:
    """GPT-2 alphabet string of raw bytes (what a byte-level BPE model works on)."""
    return "".join(map(_BYTE_TO_GPT2.__getitem__, b))


def split_utf8(b: bytes) -> list[tuple[bool, Any]]:
    """Split ``b`` into (True, str) runs of valid UTF-8 and (False, bytes) invalid stretches."""
    out: list[tuple[bool, Any]] = []
    while b:
        try:
            out.append((True, b.decode("utf-8")))
            break
        except UnicodeDecodeError as e:
            if e.start:
                out.append((True, b[: e.start].decode("utf-8")))
            out.append((False, b[e.start: e.end]))
            b = b[e.end:]
    return out


# ---- checks at the boundary ------------------------------------------------------------------
# Every loader checks what it reads before any library is built or any table allocated from it.
MAX_PIECE_BYTES = 16384  # longest token accepted (real vocabularies: at most a few hundred bytes)
_ID_SLACK = 65536  # ids no file entry defines, beyond twice the entries, that a file may leave


def is_int(x: Any) -> bool:
    """An integer that is no bool (JSON ``true`` is no token id)."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_id_space(path: Any, max_id: int, n_entries: int, what: str = "token id") -> int:
    """The table size ``max_id + 1``, once the largest id is known to fit the file: ids stay below
    2^31 and below twice the entries the file defines plus a slack, so that a 40 KB file cannot make
    a 17 GB table."""
    bound = 2 * n_entries + _ID_SLACK
    if max_id >= 2 ** 31 - 1 or max_id >= bound:
        raise VocabError(f"{path}: {what} {max_id} is out of range: the file defines {n_entries:,} entries, "
                         f"so ids must stay below {min(bound, 2 ** 31 - 1):,}")
    return max_id + 1


def check_piece_length(path: Any, what: str, piece: bytes) -> None:
    if len(piece) > MAX_PIECE_BYTES:
        raise VocabError(f"{path}: {what} is {len(piece):,} bytes long (at most {MAX_PIECE_BYTES:,} accepted)")


def utf8_piece(path: Any, what: str, s: Any) -> bytes:
    """The UTF-8 of a token string read from a file, length-checked; VocabError for non-strings and
    strings that are no valid Unicode (lone surrogates)."""
    if isinstance(s, (bytes, bytearray)):  # protobuf (upb) returns bytes for a string that is no UTF-8
        raise VocabError(f"{path}: {what} is not valid UTF-8")
    if not isinstance(s, str):
        raise VocabError(f"{path}: {what} is {type(s).__name__}, not a string")
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError:
        raise VocabError(f"{path}: {what} is not valid UTF-8 (lone surrogate)") from None
    check_piece_length(path, what, b)
    return b


def check_all_bytes(path: Any, pieces: Iterable[bytes]) -> None:
    """A byte-level rank file holds the 256 single bytes (BPE starts from them; tiktoken panics
    on a byte it has no rank for)."""
    singles = {p[0] for p in pieces if len(p) == 1}
    if len(singles) != 256:
        missing = sorted(set(range(256)) - singles)
        raise VocabError(f"{path}: {256 - len(singles)} of the 256 single bytes have no rank (first: "
                         f"0x{missing[0]:02x}); a byte-level rank file must hold all of them")


def is_library_failure(e: BaseException) -> bool:
    """A tokenizer library's own failure: any Exception, or a Rust panic (pyo3's PanicException
    derives from BaseException). KeyboardInterrupt, SystemExit and GeneratorExit are not."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def library_call(path: Any, what: str, fn: Callable, *args, **kwargs):
    """``fn(*args)``, a library failure turned into a VocabError naming the file."""
    try:
        return fn(*args, **kwargs)
    except VocabError:
        raise
    except BaseException as e:
        if not is_library_failure(e):
            raise
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise VocabError(f"{path}: {what} ({type(e).__name__}: {msg})") from None


# ---- special-token roles ---------------------------------------------------------------------
_ROLE_NAMES = {
    "bos": {"s", "bos", "beginoftext", "beginofsentence", "startoftext", "cls"},
    "eos": {"/s", "eos", "endoftext", "endofsentence", "sep"},
    "pad": {"pad"},
    "unk": {"unk"},
}
_ROLE_STRIP = re.compile(r"[<>|｜▁_\s\[\]]")


def role_from_name(content: str) -> str:
    """Role guessed from a special token's text (``<s>``, ``<|endoftext|>``, ``[PAD]``, ...)."""
    key = _ROLE_STRIP.sub("", content.lower())
    for role, names in _ROLE_NAMES.items():
        if key in names:
            return role
    return "other"


def assign_roles(special_text: dict[int, str], explicit: dict[str, Iterable[int]] | None = None,
                 guess: bool = True) -> dict[int, str]:
    """id -> role for every special id. ``explicit`` (role -> ids, strongest first) wins; the rest
    are guessed from their names (``guess``) or ``other``."""
    roles = {i: "other" for i in special_text}
    done: set[int] = set()
    for role, ids in (explicit or {}).items():
        for i in ids:
            if i in roles and i not in done:
                roles[i] = role
                done.add(i)
    if guess:
        given = {roles[i] for i in done}
        for i, text in special_text.items():
            if i not in done:
                role = role_from_name(text)
                roles[i] = "other" if role in given else role
    return roles


_FAST_RAW_MIN = 256  # pieces in one encode_raw call before the fast encoder is built


def _fast_raw_default() -> bool:
    return os.environ.get("CTALIGN_ENCODE_RAW", "").strip().lower() != "slow"


# ---- the vocabulary ----------------------------------------------------------------------------
class Backend:
    """The tokenizer's own encoder behind a :class:`Vocab` (one subclass per family).

    ``encode_text``: ordinary encoding (no bos/eos, special-token text is encoded as text).
    ``encode_raw_texts``: batch encoding of UTF-8 pieces without prefix space or specials.
    ``encode_raw_invalid``: the same for byte strings that are not valid UTF-8.
    ``normalize``: the text that the tokens' bytes spell (before any prefix space).
    """

    def encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_raw_texts(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_raw_invalid(self, pieces: list[bytes]) -> list[list[int]]:
        raise NotImplementedError

    def normalize(self, text: str) -> str:
        return text

    #: the tokenizer applies a Unicode canonical form (NFC / NFD) that ``encode_raw_texts_unnormalized`` skips
    canonical_normalizer = False

    def encode_raw_texts_unnormalized(self, texts: list[str]) -> list[list[int]]:
        """``encode_raw_texts`` without the Unicode canonical form (NFC / NFD) of the normalizer:
        the model's tokenization of the exact characters. Lossy steps (lowercase, NFKC) stay."""
        return self.encode_raw_texts(texts)

    def encode_with_byte_fallback(self, piece: bytes) -> list[int]:
        """Valid UTF-8 runs through ``encode_raw_texts``, every other byte to its byte-fallback
        piece (``<0xNN>``), else unk. Needs ``_byte_ids`` (byte -> id), ``_unk_id`` and ``_path``."""
        ids: list[int] = []
        for valid, chunk in split_utf8(piece):
            if valid:
                ids.extend(self.encode_raw_texts([chunk])[0])
                continue
            for b in chunk:
                if b in self._byte_ids:
                    ids.append(self._byte_ids[b])
                elif self._unk_id is not None:
                    ids.append(self._unk_id)
                else:
                    raise VocabError(f"{self._path}: byte 0x{b:02x} cannot be encoded (no byte fallback, no unk)")
        return ids

    def fast_raw_encoder(self, vocab: "Vocab"):
        """An object whose ``encode(texts, slow)`` equals ``encode_raw_texts`` faster, or None."""
        return None


class Vocab:
    """One tokenizer's vocabulary in byte space (see the module docstring).

    Attributes: ``name``, ``source`` (path), ``kind`` (one of :data:`KINDS`), ``specials``
    (id -> role), ``special_ids`` (role -> first id of that role), ``special_text`` (id -> the
    special token's text), ``prefix_space``, ``normalizer`` (every text change the tokenizer makes,
    e.g. ``"nfc"``, or None), ``lossy_normalizer`` (the steps that lose information, e.g.
    ``"lowercase+strip_accents"``, or None), ``ranks`` (token ids in BPE priority order, position =
    rank, for tiktoken/Tekken and SentencePiece BPE), ``merges`` ((left, right) id pairs in rank
    order for HF/GPT-2 BPE), ``word_start`` (WordPiece: bool per id), ``unk_id``.
    """

    def __init__(self, *, name: str, source: str, kind: str, pieces: list[bytes | None],
                 special_text: dict[int, str], roles: dict[int, str], backend: Backend,
                 prefix_space: bool = False, normalizer: str | None = None,
                 lossy_normalizer: str | None = None,
                 merges: Callable[[], list[tuple[int, int]]] | list[tuple[int, int]] | None = None,
                 ranks: list[int] | None = None, word_start: np.ndarray | None = None,
                 unk_id: int | None = None, details: dict[str, Any] | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown vocabulary kind {kind!r}")
        for i in special_text:
            pieces[i] = None
        self.name = name
        self.source = source
        self.kind = kind
        self._pieces = [p if p else None for p in pieces]
        self.special_text = dict(sorted(special_text.items()))
        self.specials = {i: roles.get(i, "other") for i in self.special_text}
        self.special_ids: dict[str, int] = {}
        for i, role in self.specials.items():
            self.special_ids.setdefault(role, i)
        self.prefix_space = bool(prefix_space)
        self.normalizer = normalizer
        self.lossy_normalizer = lossy_normalizer
        self._merges_src = merges
        self.ranks = ranks
        self.word_start = word_start
        self.unk_id = unk_id
        self.details = dict(details or {})
        self._backend = backend

    # -- sizes and bytes --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pieces)

    @property
    def size(self) -> int:
        return len(self._pieces)

    def __repr__(self) -> str:
        return f"Vocab(name={self.name!r}, kind={self.kind!r}, size={len(self)}, source={self.source!r})"

    def token_bytes(self, i: int) -> bytes | None:
        """Bytes of token ``i``; None for special/control tokens and ids without bytes."""
        if not 0 <= i < len(self._pieces):
            raise IndexError(f"token id {i} out of range for vocabulary {self.name!r} of size {len(self)}")
        return self._pieces[i]

    def all_token_bytes(self) -> list[bytes | None]:
        """A copy of the id -> bytes list."""
        return list(self._pieces)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of ``ids`` (tokens without bytes contribute nothing)."""
        p = self._pieces
        return b"".join(p[i] or b"" for i in ids)

    def ids_of_bytes(self, b: bytes) -> list[int]:
        """Every id whose bytes equal ``b``, increasing (``▁`` and ``<0x20>`` both)."""
        return sorted(self.table.lookup(bytes(b)))

    @property
    def merges(self) -> list[tuple[int, int]] | None:
        """(left id, right id) per BPE merge in rank order (HF merge lists, GPT-2 vocab.bpe)."""
        if callable(self._merges_src):
            self._merges_src = self._merges_src()
        return self._merges_src

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The tokenizer's own encoding of ``text``: no bos/eos, prefix space as the tokenizer
        adds it, special-token text encoded as ordinary text (never a special id; unk aside)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        return self._backend.encode_text(text)

    def normalize(self, text: str) -> str:
        """The text the bytes of ``encode(text)`` spell, without the prefix space (see the
        module docstring for WordPiece whitespace and unknown characters)."""
        return self._backend.normalize(text)

    def encode_raw(self, pieces: Sequence[bytes], *, fast: bool | None = None,
                   normalize: bool = True) -> list[list[int]]:
        """The tokenizer's own tokenization of each byte string, as found inside a text: no
        prefix space, no specials (their text is ordinary text), normalizer kept (SentencePiece:
        without ``remove_extra_whitespaces``, so a piece's leading space stays a word boundary).
        Pieces that are not valid UTF-8 go whole through the BPE model over raw bytes (byte-level
        BPE: the HF model on their GPT-2 alphabet string; tiktoken/Tekken: tiktoken's BPE, no regex
        split), or split into valid runs and single bytes, each byte its ``<0xNN>`` piece, else
        unk (SentencePiece, WordPiece, HF Unigram / non-byte-level BPE). One batched library call
        for all valid pieces; ``str`` pieces are not accepted.

        ``fast`` (default: on unless the environment sets ``CTALIGN_ENCODE_RAW=slow``): HF
        byte-level BPE without normalizer encodes through its own pre-tokenizer and the compiled
        BPE (``merge_table``, built by the first call with 256+ pieces or ``prepare_encode_raw``)
        instead of the library's ``encode_batch``, with the same result (see
        ``ctalign.vocab.hf_fast_raw.FastRawEncoder``); ``fast=False`` forces the library path.

        ``normalize=False``: the tokenizer's Unicode canonical form (NFC / NFD, e.g. Qwen's NFC) is not
        applied, so each piece is tokenized as the exact bytes it is (the map's dec_S: ``;`` and U+037E
        must not share a decomposition); lossy normalizers (lowercase, NFKC) still apply."""
        pieces = list(pieces)
        if set(map(type, pieces)) - {bytes}:
            for k, p in enumerate(pieces):
                if isinstance(p, (bytearray, memoryview)):
                    pieces[k] = bytes(p)
                elif not isinstance(p, bytes):
                    raise TypeError(f"encode_raw() takes byte strings; piece {k} is {type(p).__name__}")
        # Building ~10^5 small lists would trigger the cyclic GC over the whole heap many times:
        # none of them can form a cycle.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            return self._encode_raw(pieces, fast, normalize)
        finally:
            if gc_was_on:
                gc.enable()

    def _encode_raw(self, pieces: list[bytes], fast: bool | None, normalize: bool = True) -> list[list[int]]:
        # One C-level pass decodes everything; invalid bytes become lone surrogates U+DC80-U+DCFF,
        # which only non-ASCII texts can hold.
        texts = list(map(bytes.decode, pieces, repeat("utf-8"), repeat("surrogateescape")))
        find = _LONE_SURROGATE.search
        bad_pos = []
        if find("".join(texts)):
            bad_pos = [k for k, t in enumerate(texts) if not t.isascii() and find(t)]
        for k in bad_pos:
            texts[k] = ""  # encoded below, on their own
        encoder = None
        raw_form = not normalize and self._backend.canonical_normalizer
        if raw_form:
            fast = False
        if fast if fast is not None else _fast_raw_default():
            # Small calls do not build the compiled BPE for it (0.2-0.5 s for 128k-token vocabularies).
            if len(texts) >= _FAST_RAW_MIN or "_fast_raw_encoder" in self.__dict__:
                encoder = self._fast_raw_encoder
        if not texts:
            out = []
        else:
            out = None
            if encoder is not None:
                try:
                    out = encoder.encode(texts, self._backend.encode_raw_texts)
                except ValueError:  # a byte the compiled BPE has no piece for: the library decides
                    out = None
        if out is None:
            out = (self._backend.encode_raw_texts_unnormalized if raw_form else self._backend.encode_raw_texts)(texts)
        if bad_pos:
            for k, ids in zip(bad_pos, self._backend.encode_raw_invalid([pieces[k] for k in bad_pos])):
                out[k] = ids
        return out

    def prepare_encode_raw(self) -> None:
        """Builds what ``encode_raw`` uses (the library encoder; for HF byte-level BPE also the
        compiled BPE, ``merge_table``), so that later calls pay no start-up."""
        self._backend.encode_raw_texts([""])
        if _fast_raw_default():
            self._fast_raw_encoder

    @cached_property
    def _fast_raw_encoder(self):
        try:
            return self._backend.fast_raw_encoder(self)
        except (ValueError, ImportError):  # merges the compiled core rejects, no core: library path
            return None

    # -- compiled views -----------------------------------------------------------------------------
    def byte_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets int64[V+1], data uint8[], has_bytes uint8[V]): the id -> bytes table, CSR
        (docs/ARCHITECTURE.md "TokenTable"). Cached, read-only arrays."""
        return self._byte_table

    @cached_property
    def _byte_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pieces = [p or b"" for p in self._pieces]
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(b"".join(pieces), dtype=np.uint8).copy()
        has_bytes = (lengths > 0).astype(np.uint8)
        for a in (offsets, data, has_bytes):
            a.flags.writeable = False
        return offsets, data, has_bytes

    @cached_property
    def table(self):
        """``ctalign._core.TokenTable`` of this vocabulary (built once)."""
        from ctalign import _core
        offsets, data, has_bytes = self.byte_table()
        return _core.TokenTable(offsets, data, has_bytes)

    @cached_property
    def trie(self):
        """``ctalign._core.SequenceTrie`` over the token bytes (built once)."""
        from ctalign import _core
        return _core.SequenceTrie.from_token_table(self.table)

    @cached_property
    def merge_table(self):
        """``ctalign._core.MergeTable`` of a BPE vocabulary (None for Unigram and WordPiece):
        from the merge list (HF, GPT-2) or the rank order (tiktoken, Tekken, SentencePiece BPE),
        starting from bytes, or from whole characters for SentencePiece BPE; HF ``ignore_merges``
        carried over. Built once."""
        if self.kind in ("unigram", "wordpiece"):
            return None
        from ctalign import _core
        initial = "chars" if self.kind == "sentencepiece_bpe" else "bytes"
        ignore = bool(self.details.get("ignore_merges", False))
        merges = self.merges
        if merges is not None:
            pairs = np.asarray(merges, dtype=np.int32).reshape(-1, 2)
            return _core.MergeTable.from_merges(self.table, pairs, initial=initial, ignore_merges=ignore)
        if self.ranks is None:
            return None
        return _core.MergeTable.from_ranks(self.table, self.priority(), initial=initial, ignore_merges=ignore)

    def priority(self) -> np.ndarray | None:
        """int32[V]: the rank of each id in ``ranks`` (-1 for ids outside it); None without ranks."""
        if self.ranks is None:
            return None
        out = np.full(len(self), -1, dtype=np.int32)
        out[np.asarray(self.ranks, dtype=np.int64)] = np.arange(len(self.ranks), dtype=np.int32)
        return out

    @cached_property
    def fingerprint(self) -> str:
        """Hex sha256 of the id -> bytes table (``TokenTable.fingerprint``; the same definition
        is computed in Python when the compiled table is unavailable)."""
        try:
            from ctalign import _core
            if hasattr(_core, "TokenTable"):
                return str(self.table.fingerprint)
        except ImportError:
            pass
        return self.fingerprint_py()

    def fingerprint_py(self) -> str:
        """The fingerprint computed in Python (docs/ARCHITECTURE.md "TokenTable")."""
        parts = [len(self._pieces).to_bytes(8, "little")]
        for p in self._pieces:
            if p:
                parts.append(b"\x01" + len(p).to_bytes(8, "little"))
                parts.append(p)
            else:
                parts.append(b"\x00" + bytes(8))
        return hashlib.sha256(b"".join(parts)).hexdigest()

    # -- reports ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: name, kind, size, specials and roles, recorded behaviours."""
        n_without = sum(p is None for p in self._pieces)
        return {
            "name": self.name,
            "kind": self.kind,
            "size": len(self),
            "source": self.source,
            "n_specials": len(self.specials),
            "special_roles": {role: {"id": i, "text": self.special_text[i]}
                              for role, i in self.special_ids.items() if role != "other"},
            "n_other_specials": sum(r == "other" for r in self.specials.values()),
            "n_without_bytes": n_without,
            "n_ids_without_token": n_without - len(self.specials),
            "prefix_space": self.prefix_space,
            "normalizer": self.normalizer,
            "lossy_normalizer": self.lossy_normalizer,
            **self.details,
        }

    report = describe
