"""Alignment of two tokenizations (teacher, student) of the same texts.

Both tokenizations are placed in the text's UTF-8 byte offsets: token ``j`` covers ``[start, end)``;
special tokens (no bytes) have ``start == end`` at their position. From these spans the compiled
core (``cpp/token_alignment.h``) computes, for a padded batch:

* **chunks**: the spans between consecutive *common boundaries* (byte offsets that are token edges
  and fall inside no token of either side) holding at least one token; a special token of the same
  role at the same offset on both sides (matched in order) is a zero-width chunk of its own; an
  unmatched special, and padding, have chunk ``-1``. ``t_chunk[b, k]`` / ``s_chunk[b, j]``.
* for every student token ``j`` (``s_*[b, j]``): ``teacher_token`` ``k`` whose bytes hold the
  token's first byte, ``teacher_row`` ``= k - 1`` (the teacher position whose next-token
  distribution predicts it; ``-1`` when nothing does), ``prefix`` (teacher byte-trie node of the
  bytes of ``k`` before the token; ``0`` = root: the token starts at a teacher boundary),
  ``consumed`` (node of the map's dec trie: the student pieces already consumed inside ``k``; ``0``
  (none) also when no student token covers a byte of ``k`` before the token, e.g. WordPiece dropped
  the space that starts ``k``; ``-1`` where the pieces are not a prefix of any ``dec_S`` sequence,
  which never happens in the subset regime),
  ``consumed_after`` (the dec node after the token itself, ``-1`` if none), ``at_boundary`` and
  ``ends_teacher`` (the token ends where ``k`` ends).
* with ``byte_queries=K``: for byte ``i < K`` of every student token, the teacher row and byte-trie
  node whose byte conditional predicts it (``byte_row``, ``byte_prefix`` ``[B, Ls, K]``, ``-1``
  where the byte does not exist, is a dummy-prefix space, or has no teacher prediction).

Special tokens: BOS/EOS/PAD/UNK/other are zero-width (WordPiece/no-fallback ``unk`` covers the text
it replaced). A student special has a teacher prediction only when the teacher has a special of the
same role at the same offset. Positions past each row's length are padding: every output there is
``-1`` / ``False``.

SentencePiece dummy prefix: a token whose bytes start with a space that the text lacks gets
``lead = 1`` (its span starts at the text byte after that space); prefixes inside a teacher token
count that space.

Costs: spans from ids and texts, and the alignment itself, are single passes in C++ (GIL released,
rows spread over threads). 64 texts of 1024 llama3 tokens (72k mistral-v1 tokens): spans of both
sides ~4 ms, the alignment ~16 ms on one core (~10 ms on two; ~33 ms with 10 byte queries per
token), ``align()`` end to end ~32 ms (``python -m ctalign.align`` prints these figures;
``tests/test_align.py::test_alignment_speed_64x1024`` too).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

__all__ = ["Alignment", "AlignmentReport", "ROLE_CODES", "role_codes", "token_spans", "pad_ids", "align", "align_spans",
           "trie_arrays", "char_to_byte_offsets"]

ROLE_CODES = {"bos": 1, "eos": 2, "pad": 3, "unk": 4, "other": 5}

_ROLE_CACHE: "weakref.WeakKeyDictionary[Any, np.ndarray]" = weakref.WeakKeyDictionary()
_NORM_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _core():
    from ctalign import _core
    return _core


def role_codes(vocab) -> np.ndarray:
    """int32[V]: 0 for ids with bytes, else the role code of the special (``ROLE_CODES``)."""
    try:
        return _ROLE_CACHE[vocab]
    except (KeyError, TypeError):
        pass
    codes = np.zeros(len(vocab), dtype=np.int32)
    offsets = vocab.byte_table()[0]
    empty = np.flatnonzero(offsets[1:] == offsets[:-1])
    codes[empty] = ROLE_CODES["other"]
    for i, role in vocab.specials.items():
        codes[i] = ROLE_CODES.get(role, ROLE_CODES["other"])
    unk = getattr(vocab, "unk_id", None)
    if unk is not None and 0 <= unk < len(codes):
        codes[unk] = ROLE_CODES["unk"]
    codes.flags.writeable = False
    try:
        _ROLE_CACHE[vocab] = codes
    except TypeError:
        pass
    return codes


def trie_arrays(trie) -> tuple:
    """(member_node, node_parent, node_depth, node_symbol, child_start, child_node) int32 arrays of a
    ``SequenceTrie`` (what the compiled alignment walks)."""
    names = ("member_node", "node_parent", "node_depth", "node_symbol", "child_start", "child_node")
    out = []
    for n in names:
        a = trie[n] if isinstance(trie, dict) else getattr(trie, n)
        a = a() if callable(a) else a
        out.append(np.ascontiguousarray(np.asarray(a), dtype=np.int32))
    return tuple(out)


def pad_ids(ids, lengths=None, attention_mask=None, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids as a padded ``int32[B, L]`` array plus ``int64[B]`` lengths.

    ``ids``: a list of id lists (ragged), or a ``[B, L]`` array/tensor with ``lengths`` or a
    right-padded ``attention_mask`` (ones then zeros)."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    if attention_mask is not None and hasattr(attention_mask, "detach"):
        attention_mask = attention_mask.detach().cpu().numpy()
    if lengths is not None and hasattr(lengths, "detach"):
        lengths = lengths.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, L], got shape {ids.shape}")
        arr = np.ascontiguousarray(ids, dtype=np.int32)
        if lengths is None and attention_mask is not None:
            m = np.asarray(attention_mask).astype(bool)
            if m.shape != arr.shape:
                raise ValueError(f"attention_mask shape {m.shape} differs from ids shape {arr.shape}")
            lengths = m.sum(1)
            if not all(m[b, : lengths[b]].all() for b in range(len(m))):
                raise ValueError("attention_mask must be right-padded (ones, then zeros)")
        if lengths is None:
            lengths = np.full(arr.shape[0], arr.shape[1], dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if lengths.shape != (arr.shape[0],):
            raise ValueError(f"lengths must be [B] = [{arr.shape[0]}], got {lengths.shape}")
        if lengths.size and (lengths.min() < 0 or lengths.max() > arr.shape[1]):
            raise ValueError(f"lengths {lengths.tolist()} are outside [0, {arr.shape[1]}] (the ids' width)")
        return arr, lengths
    rows = [list(r) for r in ids]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    width = int(lengths.max()) if len(rows) else 0
    arr = np.full((len(rows), width), pad, dtype=np.int32)
    for b, r in enumerate(rows):
        arr[b, : len(r)] = r
    return arr, lengths


def char_to_byte_offsets(text: str, offsets) -> np.ndarray:
    """UTF-8 byte offsets of character offsets (e.g. the ``(start, end)`` pairs HF tokenizers return
    in ``Encoding.offsets``): ``int64`` array of the same shape. Offsets must lie in ``[0, len(text)]``."""
    o = np.asarray(offsets, dtype=np.int64)
    if o.size and (o.min() < 0 or o.max() > len(text)):
        raise ValueError(f"character offsets must lie in [0, {len(text)}], got [{o.min()}, {o.max()}]")
    widths = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
    cum = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(widths, out=cum[1:])
    return cum[o]


def _normalized(vocab, text: str) -> tuple[bytes, np.ndarray | None]:
    """UTF-8 of the text the vocab's tokens spell and a map from its byte offsets to the original
    text's byte offsets (None when the tokenizer does not change the text)."""
    norm = vocab.normalize(text)
    if norm == text:
        return text.encode("utf-8"), None
    cache = _NORM_CACHE.setdefault(vocab, {}) if _cacheable(vocab) else {}
    parts = []
    for ch in text:
        n = cache.get(ch)
        if n is None:
            n = cache[ch] = ch if ch.isspace() else vocab.normalize(ch)
        parts.append(n)
    if "".join("".join(parts).split()) != "".join(norm.split()):
        raise ValueError(
            f"{vocab.name}: its normalizer ({vocab.lossy_normalizer or vocab.normalizer}) does not act "
            f"character by character on this text, so byte offsets cannot be mapped back to it; pass "
            f"texts already normalized with vocab.normalize() (as bytes)")
    # Offset i of the normalized bytes maps to the start of its character when i is at or before
    # the first non-space byte of that character's normalization, else to the character's end: a
    # monotone map, so token spans stay ordered (a token boundary inside one character's
    # normalization falls on the character's end).
    out = bytearray()
    back = []
    pos = 0
    for ch, n in zip(text, parts):
        nb = n.encode("utf-8")
        width = len(ch.encode("utf-8"))
        stripped = nb.lstrip(b" \t\n\r\x0b\x0c")
        first = len(nb) - len(stripped)
        back.extend([pos] * min(first + 1, len(nb)))
        back.extend([pos + width] * (len(nb) - min(first + 1, len(nb))))
        out += nb
        pos += width
    back.append(pos)
    return bytes(out), np.asarray(back, dtype=np.int64)


def _cacheable(vocab) -> bool:
    try:
        weakref.ref(vocab)
        return True
    except TypeError:
        return False


def _skips_whitespace(vocab) -> bool:
    """Whether the tokens may leave whitespace of the text uncovered (WordPiece, collapsed spaces)."""
    norm = " ".join(str(x) for x in (getattr(vocab, "normalizer", None), getattr(vocab, "lossy_normalizer", None)) if x)
    return vocab.kind == "wordpiece" or "whitespace" in norm


def token_spans(vocab, ids, lengths, texts: Sequence[str | bytes]):
    """Byte spans ``(start, end, lead)`` (``[B, L]`` int64/int64/int32) of each token in its text.

    Raises ``ValueError`` naming the row, token and offset where the ids do not spell the text.
    Texts given as ``bytes`` are taken as already normalized."""
    ids, lengths = pad_ids(ids, lengths)
    B = ids.shape[0]
    if len(texts) != B:
        raise ValueError(f"{len(texts)} texts for {B} rows of ids")
    encoded, maps = [], []
    for t in texts:
        if isinstance(t, (bytes, bytearray)):
            encoded.append(bytes(t))
            maps.append(None)
        elif isinstance(t, str):
            e, m = _normalized(vocab, t)
            encoded.append(e)
            maps.append(m)
        else:
            raise TypeError(f"texts must be str or bytes, not {type(t).__name__}")
    text_offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=text_offsets[1:])
    offsets, data, _ = vocab.byte_table()
    lead_space = bool(getattr(vocab, "prefix_space", False)) or vocab.kind in ("sentencepiece_bpe", "unigram")
    start, end, lead = _core().locate_tokens(ids, lengths, offsets, data, role_codes(vocab), b"".join(encoded),
                                             text_offsets, lead_space=lead_space,
                                             skip_space=_skips_whitespace(vocab))
    if any(m is not None for m in maps):
        start, end = start.copy(), end.copy()
        for b, m in enumerate(maps):
            if m is not None:
                n = lengths[b]
                start[b, :n] = m[start[b, :n]]
                end[b, :n] = m[end[b, :n]]
    return start, end, lead


@dataclass
class Alignment:
    """Alignment of a padded batch (torch tensors; layouts in the module docstring)."""

    teacher_lengths: Any
    student_lengths: Any
    t_start: Any
    t_end: Any
    t_lead: Any
    t_role: Any
    s_start: Any
    s_end: Any
    s_lead: Any
    s_role: Any
    n_chunks: Any
    chunk_start: Any
    chunk_end: Any
    chunk_special: Any
    chunk_t_count: Any
    chunk_s_count: Any
    t_chunk: Any
    s_chunk: Any
    s_teacher_token: Any
    s_teacher_row: Any
    s_prefix: Any
    s_consumed: Any
    s_consumed_after: Any
    s_at_boundary: Any
    s_ends_teacher: Any
    byte_row: Any
    byte_prefix: Any
    teacher_ids: Any = None
    student_ids: Any = None
    regime: str | None = None

    @property
    def batch_size(self) -> int:
        return int(self.s_chunk.shape[0])

    def to(self, device) -> "Alignment":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if hasattr(v, "to") and not isinstance(v, str) else v
        return Alignment(**kw)

    def select(self, rows) -> "Alignment":
        """The alignment of a subset of rows (e.g. one rank's shard of a batch)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[rows] if hasattr(v, "shape") else v
        return Alignment(**kw)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def report(self, amap=None, student_mask=None) -> "AlignmentReport":
        """Counts of this batch's alignment: tokens, chunks, student tokens a teacher row predicts and,
        with the map, how many of them get an exact likelihood target
        (``ctalign.losses.exact_share``: ``exact_share``, and the approximated positions by cause).
        ``student_mask``: count only those student tokens (e.g. the loss mask). Needs torch."""
        import torch
        n_s = int(torch.as_tensor(self.student_lengths).sum())
        n_t = int(torch.as_tensor(self.teacher_lengths).sum())
        out = AlignmentReport(teacher_tokens=n_t, student_tokens=n_s,
                              chunks=int(torch.as_tensor(self.n_chunks).sum()), regime=self.regime)
        if amap is not None:
            from ctalign.losses.likelihood import exact_share
            sh = exact_share(amap, self, student_mask=student_mask)
            out.update(regime=getattr(amap, "regime", self.regime), predicted=sh["predicted"],
                       with_target=sh["with_target"], exact=sh["exact"], exact_share=sh["share"],
                       crossing=sh["crossing"], not_dec_prefix=sh["not_dec_prefix"],
                       previous_split=sh["previous_split"])
        return out


class AlignmentReport(dict):
    """:meth:`Alignment.report`: a dict with a readable ``str``."""

    def __str__(self) -> str:
        lines = [f"{self['teacher_tokens']} teacher / {self['student_tokens']} student tokens, "
                 f"{self['chunks']} chunks, regime {self.get('regime')}"]
        if "exact" in self:
            lines.append(f"exact targets: {self['exact']} of {self['predicted']} predicted student tokens "
                         f"({100 * self['exact_share']:.1f}%); approximated: {self['crossing']} crossing a "
                         f"teacher boundary, {self['not_dec_prefix']} not dec_S pieces, {self['previous_split']} "
                         f"after a teacher token split otherwise; {self['predicted'] - self['with_target']} "
                         f"without a target")
        return "\n".join(lines)


def _torchify(d: dict) -> dict:
    try:
        import torch
    except ImportError:  # numpy arrays then
        return d
    out = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(v))
            if v.dtype == np.uint8:
                t = t.bool()
            elif v.dtype == np.int32:
                t = t.long()
            out[k] = t
        else:
            out[k] = v
    return out


def align_spans(teacher_ids, teacher_spans, teacher_lengths, student_ids, student_spans, student_lengths, *,
                teacher_vocab, student_vocab=None, dec_trie=None, byte_queries: int = 0,
                threads: int | None = None, regime: str | None = None) -> Alignment:
    """Aligns two tokenizations given their byte spans ``(start, end, lead)`` (see :func:`token_spans`;
    ``lead`` may be None). HF offsets are character offsets: convert them to UTF-8 byte offsets first."""
    t_ids, t_len = pad_ids(teacher_ids, teacher_lengths)
    s_ids, s_len = pad_ids(student_ids, student_lengths)
    if t_ids.shape[0] != s_ids.shape[0]:
        raise ValueError(f"teacher has {t_ids.shape[0]} rows, student {s_ids.shape[0]}")

    def side(ids, lens, spans, vocab, name):
        start, end, lead = spans
        start = np.ascontiguousarray(start, dtype=np.int64)
        end = np.ascontiguousarray(end, dtype=np.int64)
        lead = np.zeros(ids.shape, np.int32) if lead is None else np.ascontiguousarray(lead, dtype=np.int32)
        if vocab is not None:
            if ids.size and (ids.min() < 0 or ids.max() >= len(vocab)):
                bad = ids[(ids < 0) | (ids >= len(vocab))][0]
                raise ValueError(f"{name} id {bad} is outside its vocabulary ({len(vocab)} ids)")
            role = role_codes(vocab)[ids]
        else:
            role = np.where(end > start, 0, ROLE_CODES["other"]).astype(np.int32)
        role = np.where(np.arange(ids.shape[1])[None, :] < lens[:, None], role, 0)
        return ids, start, end, lead, np.ascontiguousarray(role, dtype=np.int32), lens

    t = side(t_ids, t_len, teacher_spans, teacher_vocab, "teacher")
    s = side(s_ids, s_len, student_spans, student_vocab, "student")
    if threads is None:
        threads = _default_threads(t_ids.shape[0])
    byte_trie = trie_arrays(teacher_vocab.trie)
    dec = trie_arrays(dec_trie) if dec_trie is not None else None
    d = _core().align_tokens(*t, *s, byte_trie, dec, int(byte_queries), int(threads))
    d.update(teacher_ids=t[0].astype(np.int64), student_ids=s[0].astype(np.int64),
             teacher_lengths=t[5], student_lengths=s[5], t_start=t[1], t_end=t[2], t_lead=t[3], t_role=t[4],
             s_start=s[1], s_end=s[2], s_lead=s[3], s_role=s[4])
    d = _torchify(d)
    return Alignment(regime=regime, **d)


def _default_threads(rows: int) -> int:
    try:
        import torch
        n = torch.get_num_threads()
    except ImportError:
        import os
        n = os.cpu_count() or 1
    return max(1, min(n, rows // 8 or 1))


def _texts_from_ids(t_vocab, t_ids, t_len, s_vocab, s_ids, s_len) -> list[bytes]:
    texts = []
    for b in range(t_ids.shape[0]):
        tb = t_vocab.decode_bytes(t_ids[b, : t_len[b]].tolist())
        sb = s_vocab.decode_bytes(s_ids[b, : s_len[b]].tolist())
        if tb == sb:
            texts.append(tb)
        elif tb == b" " + sb:
            texts.append(sb)
        elif sb == b" " + tb:
            texts.append(tb)
        else:
            raise ValueError(
                f"row {b}: the teacher ids spell {tb[:40]!r}... and the student ids {sb[:40]!r}...: "
                f"not the same text (pass texts= when a tokenizer normalizes or drops whitespace)")
    return texts


def vocabs_of_map(amap, teacher_vocab, student_vocab, who: str):
    """The (teacher, student) vocabularies to use with ``amap``: the given ones, checked against the
    map's fingerprints (MapMismatchError when the map was built for other tokenizers), else the
    map's own."""
    if amap is not None:
        other_t = teacher_vocab if teacher_vocab is not None and teacher_vocab is not amap.teacher else None
        other_s = student_vocab if student_vocab is not None and student_vocab is not amap.student else None
        if other_t is not None or other_s is not None:
            amap.verify(other_t, other_s)  # attaches them, so the next call skips the check
        teacher_vocab = teacher_vocab or amap.teacher
        student_vocab = student_vocab or amap.student
    if teacher_vocab is None or student_vocab is None:
        raise ValueError(f"{who} needs the vocabularies: pass amap= or teacher_vocab= and student_vocab=")
    return teacher_vocab, student_vocab


def align(teacher_ids, student_ids, *, amap=None, teacher_vocab=None, student_vocab=None, texts=None,
          teacher_lengths=None, student_lengths=None, byte_queries: int = 0,
          threads: int | None = None) -> Alignment:
    """Aligns the teacher's and the student's tokenizations of the same texts.

    ``teacher_ids``/``student_ids``: ragged id lists or padded ``[B, L]`` arrays/tensors (with
    ``*_lengths``). ``amap``: the :class:`~ctalign.AlignmentMap` (gives both vocabularies and the
    dec trie for ``consumed``); or pass ``teacher_vocab``/``student_vocab``. ``texts``: the texts
    (str, or already normalized bytes); without them the two sides must spell the same bytes
    (up to a dummy-prefix space). Raises ``ValueError`` when the ids do not tokenize the texts.
    """
    teacher_vocab, student_vocab = vocabs_of_map(amap, teacher_vocab, student_vocab, "align()")
    t_ids, t_len = pad_ids(teacher_ids, teacher_lengths)
    s_ids, s_len = pad_ids(student_ids, student_lengths)
    if t_ids.shape[0] != s_ids.shape[0]:
        raise ValueError(f"teacher has {t_ids.shape[0]} rows, student {s_ids.shape[0]}")
    if texts is None:
        texts = _texts_from_ids(teacher_vocab, t_ids, t_len, student_vocab, s_ids, s_len)
    elif isinstance(texts, (str, bytes)):
        texts = [texts]
    t_spans = token_spans(teacher_vocab, t_ids, t_len, texts)
    s_spans = token_spans(student_vocab, s_ids, s_len, texts)
    return align_spans(t_ids, t_spans, t_len, s_ids, s_spans, s_len, teacher_vocab=teacher_vocab,
                       student_vocab=student_vocab, dec_trie=amap.trie_arrays("dec_trie") if amap is not None else None,
                       byte_queries=byte_queries, threads=threads,
                       regime=getattr(amap, "regime", None) if amap else None)


def _bench(batch: int = 64, tokens: int = 1024) -> None:  # pragma: no cover - manual report
    from ctalign import assets, build_map, load_vocab
    text = assets.path("botchan-text").read_text(encoding="utf-8")[:30000]
    t = load_vocab(assets.path("llama3"))
    s = load_vocab(assets.path("mistral-v1"))
    amap = build_map(t, s)
    base = t.encode(text)
    rows = [base[(i * 97) % 2000:(i * 97) % 2000 + tokens] for i in range(batch)]
    texts = [t.decode_bytes(r).decode("utf-8", errors="ignore") for r in rows]
    t_ids, t_len = pad_ids([t.encode(x) for x in texts])
    s_ids, s_len = pad_ids([s.encode(x) for x in texts])
    t_spans = token_spans(t, t_ids, t_len, texts)
    s_spans = token_spans(s, s_ids, s_len, texts)
    dec = amap.trie_arrays("dec_trie")

    def best(fn, n=10):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    print(f"{batch} texts, {int(t_len.sum())} llama3 / {int(s_len.sum())} mistral-v1 tokens")
    print(f"  spans, both sides:      {best(lambda: (token_spans(t, t_ids, t_len, texts), token_spans(s, s_ids, s_len, texts)), 5):7.1f} ms")
    for threads in (1, 2):
        for k in (0, 10):
            ms = best(lambda: align_spans(t_ids, t_spans, t_len, s_ids, s_spans, s_len, teacher_vocab=t,
                                          student_vocab=s, dec_trie=dec, threads=threads, byte_queries=k))
            print(f"  alignment, {threads} thread(s), {k:2d} byte queries: {ms:7.1f} ms")
    print(f"  align() end to end:     {best(lambda: align(t_ids, s_ids, amap=amap, texts=texts, teacher_lengths=t_len, student_lengths=s_len), 5):7.1f} ms")


if __name__ == "__main__":  # pragma: no cover
    _bench()
