"""SentencePiece ``.model`` loader (see ctalign.vocab).

Bytes come from the model proto: ``▁`` -> space (when the model escapes whitespace), BYTE pieces
``<0xNN>`` -> byte NN, CONTROL/UNKNOWN pieces -> no bytes (specials with roles from the trainer
spec's unk/bos/eos/pad ids). ``encode_raw`` uses a copy of the proto with ``add_dummy_prefix``
and ``remove_extra_whitespaces`` off: pieces are tokenized as they would be inside a text, where
one leading space is a word boundary, not extra whitespace. Byte strings that are not valid UTF-8
are split into valid runs and single bytes (byte fallback ``<0xNN>``, else unk).
"""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from ctalign.errors import VocabError
from ctalign.vocab.base import Backend, Vocab, assign_roles, library_call, utf8_piece

_SPACE_MARK = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_KIND = {1: "unigram", 2: "sentencepiece_bpe", 3: "unigram", 4: "unigram"}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def looks_like_sentencepiece(head: bytes) -> bool:
    """A serialized ModelProto starts with its first piece (field 1, length-delimited)."""
    return head[:1] == b"\x0a"


class SPBackend(Backend):
    def __init__(self, path: Path, proto, *, byte_ids: dict[int, int], unk_id: int | None):
        self._path = path
        self._proto = proto
        self._byte_ids = byte_ids
        self._unk_id = unk_id
        ns = proto.normalizer_spec
        self._escape = ns.escape_whitespaces
        self._dummy = ns.add_dummy_prefix
        self._suffix = proto.trainer_spec.treat_whitespace_as_suffix

    @staticmethod
    def _processor(proto):
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @cached_property
    def processor(self):
        return self._processor(self._proto)

    @cached_property
    def raw_processor(self):
        from sentencepiece import sentencepiece_model_pb2 as pb
        raw = pb.ModelProto()
        raw.CopyFrom(self._proto)
        raw.normalizer_spec.add_dummy_prefix = False
        raw.normalizer_spec.remove_extra_whitespaces = False
        return self._processor(raw)

    def encode_text(self, text: str) -> list[int]:
        return library_call(self._path, "sentencepiece failed to encode", self.processor.encode, text,
                            out_type=int, add_bos=False, add_eos=False)

    def encode_raw_texts(self, texts: list[str]) -> list[list[int]]:
        return library_call(self._path, "sentencepiece failed to encode", self.raw_processor.encode, texts,
                            out_type=int, add_bos=False, add_eos=False)

    def encode_raw_invalid(self, pieces: list[bytes]) -> list[list[int]]:
        return [self.encode_with_byte_fallback(p) for p in pieces]

    def normalize(self, text: str) -> str:
        n = self.processor.normalize(text)
        if self._escape:
            n = n.replace(_SPACE_MARK, " ")
        if self._dummy and n:
            if self._suffix and n.endswith(" "):
                n = n[:-1]
            elif not self._suffix and n.startswith(" "):
                n = n[1:]
        return n


def load_sentencepiece(path: Path, *, name: str) -> Vocab:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VocabError(f"{path}: cannot read ({e.strerror})") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise VocabError(f"{path}: not a SentencePiece model (the protobuf does not parse: {e})") from None
    if len(proto.pieces) == 0:
        raise VocabError(f"{path}: not a SentencePiece model (no pieces)")
    for i, p in enumerate(proto.pieces):  # before the library sees them: text, length
        utf8_piece(path, f"piece {i}", p.piece)  # upb hands out bytes for invalid UTF-8
    backend_check = SPBackend(path, proto, byte_ids={}, unk_id=None)
    library_call(path, "sentencepiece cannot load this model", lambda: backend_check.processor)

    ns, ts = proto.normalizer_spec, proto.trainer_spec
    escape = ns.escape_whitespaces
    pieces: list[bytes | None] = []
    special_text: dict[int, str] = {}
    byte_ids: dict[int, int] = {}
    unk_id = None
    normal: list[tuple[float, int]] = []
    for i, p in enumerate(proto.pieces):
        t = p.type
        if t in (CONTROL, UNKNOWN):
            special_text[i] = p.piece
            pieces.append(None)
            if t == UNKNOWN and unk_id is None:
                unk_id = i
        elif t == BYTE:
            m = _BYTE_PIECE.fullmatch(p.piece)
            if m is None:
                raise VocabError(f"{path}: byte piece {i} ({p.piece[:20]!r}) is not <0xNN>")
            b = int(m.group(1), 16)
            pieces.append(bytes([b]))
            byte_ids.setdefault(b, i)
        else:
            s = p.piece.replace(_SPACE_MARK, " ") if escape else p.piece
            pieces.append(s.encode("utf-8"))
            if t == NORMAL:
                normal.append((-p.score, i))
    explicit = {}
    for role, rid in (("unk", ts.unk_id), ("bos", ts.bos_id), ("eos", ts.eos_id), ("pad", ts.pad_id)):
        if 0 <= rid < len(pieces) and rid in special_text:
            explicit[role] = [rid]
    roles = assign_roles(special_text, explicit, guess=False)
    kind = _KIND.get(ts.model_type, "unigram")
    ranks = [i for _, i in sorted(normal)] if kind == "sentencepiece_bpe" else None

    steps = []
    if ns.name and ns.name != "identity" or (ns.name == "identity" and len(ns.precompiled_charsmap)):
        steps.append(ns.name or "custom")
    if ns.remove_extra_whitespaces:
        steps.append("collapse_whitespace")
    backend = SPBackend(path, proto, byte_ids=byte_ids, unk_id=unk_id)
    backend.__dict__["processor"] = backend_check.processor
    return Vocab(name=name, source=str(path), kind=kind, pieces=pieces, special_text=special_text,
                 roles=roles, backend=backend, prefix_space=bool(ns.add_dummy_prefix),
                 normalizer="+".join(steps) or None, lossy_normalizer="+".join(steps) or None,
                 ranks=ranks, unk_id=unk_id,
                 details={"format": "sentencepiece", "byte_fallback": bool(ts.byte_fallback),
                          "model_type": ts.model_type})
