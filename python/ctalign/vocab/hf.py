"""HF ``tokenizer.json`` and GPT-2 ``encoder.json`` + ``vocab.bpe`` loaders (see ctalign.vocab).

The file is parsed once for the id -> bytes table, the specials and the merges; the ``tokenizers``
objects that encode are built lazily from the same text. ``encode_raw`` uses a copy whose
normalizer and pre-tokenizer have the prefix space removed (ByteLevel ``add_prefix_space=false``,
Metaspace ``prepend_scheme="never"``, no ``Prepend`` normalizer) and no post-processor, with
special-token text encoded as text. Byte strings that are not valid UTF-8 go straight through the
BPE model over their GPT-2 alphabet characters (byte-level BPE), or split into valid runs and
single bytes (``<0xNN>`` byte fallback, else unk) for the other families.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import re
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctalign.errors import VocabError
from ctalign.vocab.hf_fast_raw import FastRawEncoder, _flatten, _steps, is_known_pre_tokenizer
from ctalign.vocab.base import (Backend, Vocab, assign_roles, check_id_space, gpt2_alphabet, gpt2_token_bytes,
                                is_int, is_library_failure, library_call, utf8_piece)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_MARK = "\u2581"  # ▁
_CANONICAL = ("NFC", "NFD")  # normalizer steps that only pick a canonically equivalent form


def _read_json(path: Path) -> tuple[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VocabError(f"{path}: not a UTF-8 text file (expected JSON)") from None
    except OSError as e:
        raise VocabError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise VocabError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise VocabError(f"{path}: JSON nested too deeply to be a tokenizer file") from None


def load_json_file(path: Path, *, name: str) -> Vocab:
    """A ``.json`` file: HF tokenizer.json, Mistral Tekken, or a GPT-2 encoder.json."""
    text, data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return load_hf_tokenizer(path, text, data, name=name)
    if isinstance(data, dict) and "config" in data and isinstance(data.get("vocab"), list):
        from ctalign.vocab.tiktoken_ranks import load_tekken
        return load_tekken(path, data, name=name)
    if isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values()):
        for merges in ("vocab.bpe", "merges.txt"):
            if (path.parent / merges).is_file():
                return load_gpt2_pair(path, path.parent / merges, name=name, encoder=data)
        raise VocabError(f"{path}: a GPT-2 style encoder needs its merges (vocab.bpe or merges.txt) beside it")
    raise VocabError(f"{path}: JSON file is not a tokenizer (no HF 'model' section, no Tekken "
                     f"'config' + 'vocab', not a token -> id encoder)")


# ---- component analysis -------------------------------------------------------------------------
def _is_space_to_mark(n: dict) -> bool:
    pat = n.get("pattern") or {}
    return n.get("type") == "Replace" and pat.get("String") == " " and n.get("content") == _SPACE_MARK


def _normalizer_steps(normalizer: Any) -> tuple[list[str], list[str], bool, bool]:
    """(all steps, lossy steps, prepends a space mark, maps spaces to ▁)."""
    steps: list[str] = []
    lossy: list[str] = []
    prepend = marks = False
    for n in _flatten(normalizer, "normalizers"):
        t = n.get("type")
        if t == "Prepend":
            prepend = True
        elif _is_space_to_mark(n):
            marks = True
        elif t in ("NFC", "NFD"):
            steps.append(t.lower())
        elif t in ("NFKC", "NFKD"):
            steps.append(t.lower())
            lossy.append(t.lower())
        elif t == "Lowercase":
            steps.append("lowercase")
            lossy.append("lowercase")
        elif t == "StripAccents":
            steps.append("strip_accents")
            lossy.append("strip_accents")
        elif t == "BertNormalizer":
            for flag, step in (("clean_text", "clean_text"), ("handle_chinese_chars", "cjk_spacing"),
                               ("lowercase", "lowercase")):
                if n.get(flag, True):
                    steps.append(step)
                    if step != "cjk_spacing":
                        lossy.append(step)
            strip = n.get("strip_accents")
            if strip or (strip is None and n.get("lowercase", True)):
                steps.append("strip_accents")
                lossy.append("strip_accents")
        elif t is not None:
            name = t.lower()
            steps.append(name)
            lossy.append(name)
    return steps, lossy, prepend, marks


def _normalizer_without_markers(normalizer: Any) -> Any:
    """The normalizer with Prepend and space -> ▁ replacement removed (None if nothing is left)."""
    kept = [n for n in _flatten(normalizer, "normalizers")
            if n.get("type") != "Prepend" and not _is_space_to_mark(n)]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else {"type": "Sequence", "normalizers": kept}


def _pretokenizer_without_prefix(pre: Any) -> Any:
    pre = copy.deepcopy(pre)
    for n in _flatten(pre, "pretokenizers"):
        if n.get("type") == "ByteLevel":
            n["add_prefix_space"] = False
        elif n.get("type") == "Metaspace":
            n["add_prefix_space"] = False
            n["prepend_scheme"] = "never"
    return pre


def _component_tokenizer(normalizer: Any, pre_tokenizer: Any):
    """A tiny tokenizer carrying the given normalizer and pre-tokenizer (to lend them out)."""
    from tokenizers import Tokenizer
    d = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
         "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
         "decoder": None, "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"}}
    return library_call("<components>", "the tokenizers library rejects its normalizer or pre-tokenizer",
                        Tokenizer.from_str, json.dumps(d))


# ---- the encoder ------------------------------------------------------------------------------------
class HFBackend(Backend):
    def __init__(self, path: Path, text: str, normalizer: Any, pre_tokenizer: Any, *, byte_level: bool,
                 needs_raw_copy: bool, byte_ids: dict[int, int], unk_id: int | None,
                 before_load: Callable[[], Any] | None = None, added: list[tuple[str, int]] = ()):
        self._path = path
        self._added = list(added)
        self._before_load = before_load  # the checks the library must not see fail (merges)
        self._text = text
        self._normalizer = normalizer
        self._pre_tokenizer = pre_tokenizer
        self._byte_level = byte_level
        self._needs_raw_copy = needs_raw_copy
        self._byte_ids = byte_ids
        self._unk_id = unk_id

    def _load(self):
        from tokenizers import Tokenizer
        if self._before_load is not None:
            self._before_load()
        try:
            tok = Tokenizer.from_str(self._text)
        except BaseException as e:  # the library's own parser (a Rust panic too): report which file
            if not is_library_failure(e):
                raise
            raise VocabError(f"{self._path}: the tokenizers library cannot load it ({' '.join(str(e).split())[:300]})") from None
        for content, i in self._added:  # the library ignores the file's ids where the model's ids have gaps
            got = tok.token_to_id(content)
            if got != i:
                raise VocabError(f"{self._path}: added token {content[:40]!r} has id {i} in the file, but the "
                                 f"tokenizers library gives it id {got} (the model's ids leave gaps before it)")
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True
        if self._normalizer is not None and not _flatten(self._normalizer, "normalizers"):
            tok.normalizer = None  # an empty Sequence changes nothing but doubles encode time
        return tok

    @cached_property
    def tokenizer(self):
        return self._load()

    @cached_property
    def raw_tokenizer(self):
        if not self._needs_raw_copy:
            return self.tokenizer
        tok = self._load()
        comp = _component_tokenizer(_normalizer_without_prefix(self._normalizer),
                                    _pretokenizer_without_prefix(self._pre_tokenizer))
        tok.normalizer = comp.normalizer
        tok.pre_tokenizer = comp.pre_tokenizer
        tok.post_processor = None
        return tok

    @property
    def canonical_normalizer(self) -> bool:
        return any(n.get("type") in _CANONICAL for n in _flatten(self._normalizer, "normalizers"))

    @cached_property
    def raw_tokenizer_unnormalized(self):
        """``raw_tokenizer`` without the Unicode canonical forms (NFC / NFD) of the normalizer."""
        tok = self._load()
        kept = [n for n in _flatten(self._normalizer, "normalizers")
                if n.get("type") != "Prepend" and n.get("type") not in _CANONICAL]
        norm = None if not kept else kept[0] if len(kept) == 1 else {"type": "Sequence", "normalizers": kept}
        comp = _component_tokenizer(norm, _pretokenizer_without_prefix(self._pre_tokenizer))
        tok.normalizer = comp.normalizer
        tok.pre_tokenizer = comp.pre_tokenizer
        tok.post_processor = None
        return tok

    def encode_raw_texts_unnormalized(self, texts: list[str]) -> list[list[int]]:
        tok = self.raw_tokenizer_unnormalized
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return library_call(self._path, "the tokenizers library failed to encode",
                            lambda: [e.ids for e in batch(texts, add_special_tokens=False)])

    @cached_property
    def _plain_normalizer(self):
        n = _normalizer_without_markers(self._normalizer)
        return None if n is None else _component_tokenizer(n, None).normalizer

    def encode_text(self, text: str) -> list[int]:
        tok = self.tokenizer
        return library_call(self._path, "the tokenizers library failed to encode",
                            lambda: tok.encode(text, add_special_tokens=False).ids)

    def encode_raw_texts(self, texts: list[str]) -> list[list[int]]:
        tok = self.raw_tokenizer
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the same ids, no offsets
        return library_call(self._path, "the tokenizers library failed to encode",
                            lambda: [e.ids for e in batch(texts, add_special_tokens=False)])

    def encode_raw_invalid(self, pieces: list[bytes]) -> list[list[int]]:
        if self._byte_level:
            model = self.raw_tokenizer.model
            return library_call(self._path, "the tokenizers library failed to encode",
                                lambda: [[t.id for t in model.tokenize(gpt2_alphabet(p))] for p in pieces])
        return [self.encode_with_byte_fallback(p) for p in pieces]

    def fast_raw_encoder(self, vocab: Vocab):
        """A :class:`FastRawEncoder` when this tokenizer is a plain byte-level BPE (no normalizer
        once the prefix space is removed, no dropout / subword affixes) with one of the pre-tokenizers
        whose whole-piece shapes are known (``hf_fast_raw._KNOWN_PRE_TOKENIZERS``), and no two ids of
        its BPE model spell the same bytes; else None, and the library encodes.

        Other pre-tokenizers would take every piece through ``pre_tokenize_str`` one by one, which
        measured no faster than the library (SmolLM2's GGUF: 3.2 s against 3.0 s over 507k pieces).
        Duplicate byte strings (llama.cpp's command-r vocabulary spells 43 strings twice, e.g. id 297
        ``▪`` beside the byte-level 237072) make the compiled BPE's merge results ambiguous where the
        library's, over the byte alphabet's strings, are not."""
        if not self._byte_level or vocab.kind != "byte_bpe" or vocab.details.get("model") != "BPE":
            return None
        tok = self.raw_tokenizer
        model = tok.model
        if tok.normalizer is not None or getattr(model, "dropout", None) \
                or getattr(model, "continuing_subword_prefix", None) or getattr(model, "end_of_word_suffix", None):
            return None
        steps = _steps(_pretokenizer_without_prefix(self._pre_tokenizer))
        if not steps or not is_known_pre_tokenizer(steps) or tok.pre_tokenizer is None:
            return None
        added_tokens = tok.get_added_tokens_decoder()
        if _model_spells_a_string_twice(vocab, set(added_tokens)):
            return None
        merge_table = vocab.merge_table
        if merge_table is None or merge_table.initial != "bytes":
            return None
        added = [a.content for a in added_tokens.values() if a.content]
        return FastRawEncoder(tok, merge_table, steps, added)

    def normalize(self, text: str) -> str:
        n = self._plain_normalizer
        return text if n is None else n.normalize_str(text)


def _model_spells_a_string_twice(vocab: Vocab, added_ids: set[int]) -> bool:
    """Whether two ids of the BPE model (added tokens aside: their text goes to the library) have the
    same bytes."""
    pieces = [p for i, p in enumerate(vocab.all_token_bytes()) if p is not None and i not in added_ids]
    return len(set(pieces)) != len(pieces)


def _normalizer_without_prefix(normalizer: Any) -> Any:
    kept = [n for n in _flatten(normalizer, "normalizers") if n.get("type") != "Prepend"]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else {"type": "Sequence", "normalizers": kept}


# ---- tokenizer.json -----------------------------------------------------------------------------
def _config_roles(config_path: Path) -> dict[str, list[str]]:
    """Role -> special token texts from tokenizer_config.json (bos/eos/pad/unk, cls/sep weaker)."""
    if not config_path.is_file():
        return {}
    _, cfg = _read_json(config_path)
    if not isinstance(cfg, dict):
        raise VocabError(f"{config_path}: expected a JSON object")
    out: dict[str, list[str]] = {}
    for role, keys in (("bos", ("bos_token", "cls_token")), ("eos", ("eos_token", "sep_token")),
                       ("pad", ("pad_token",)), ("unk", ("unk_token",))):
        for key in keys:
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out.setdefault(role, []).append(v)
    return out


def _template_roles(post: Any, ids_of: dict[str, int]) -> dict[str, list[int]]:
    """bos/eos from a post-processor template: specials before / after the sequence."""
    out: dict[str, list[int]] = {}
    for n in _flatten(post, "processors"):
        t = n.get("type")
        if t == "TemplateProcessing":
            single = n.get("single") or []
            seq_at = [k for k, item in enumerate(single) if "Sequence" in item]
            if not seq_at:
                continue
            specials = n.get("special_tokens") or {}

            def ids(item):
                name = item["SpecialToken"]["id"]
                return list((specials.get(name) or {}).get("ids") or [ids_of.get(name, -1)])
            for k, item in enumerate(single):
                if "SpecialToken" in item:
                    role = "bos" if k < seq_at[0] else "eos"
                    out.setdefault(role, []).extend(ids(item))
        elif t in ("BertProcessing", "RobertaProcessing"):
            if isinstance(n.get("cls"), list):
                out.setdefault("bos", []).append(int(n["cls"][1]))
            if isinstance(n.get("sep"), list):
                out.setdefault("eos", []).append(int(n["sep"][1]))
    return out


def load_hf_tokenizer(path: Path, text: str, data: dict, *, name: str, source: Path | None = None,
                      config_path: Path | None = None) -> Vocab:
    try:
        return _load_hf(path, text, data, name=name, source=source, config_path=config_path)
    except VocabError:
        raise
    except RecursionError:
        raise VocabError(f"{path}: malformed tokenizer.json (components nested too deeply)") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise VocabError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None


def _load_hf(path, text, data, *, name, source, config_path) -> Vocab:
    model = data["model"]
    mtype = model.get("type")
    if mtype is None:  # old files: infer the model from its fields
        mtype = ("BPE" if "merges" in model else "Unigram" if isinstance(model.get("vocab"), list)
                 else "WordPiece" if "continuing_subword_prefix" in model else None)
    pre = data.get("pre_tokenizer")
    pres = _flatten(pre, "pretokenizers")
    decs = _flatten(data.get("decoder"), "decoders")
    norm_steps, lossy, prepend, marks = _normalizer_steps(data.get("normalizer"))
    byte_level = any(n.get("type") == "ByteLevel" for n in pres + decs)
    metaspace = marks or any(n.get("type") == "Metaspace" for n in pres + decs) or any(
        n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == _SPACE_MARK for n in decs)
    prefix_space = prepend
    for n in pres:
        if n.get("type") == "ByteLevel" and n.get("add_prefix_space"):
            prefix_space = True
        if n.get("type") == "Metaspace":
            scheme = n.get("prepend_scheme")
            if scheme in ("always", "first") or (scheme is None and n.get("add_prefix_space", True)):
                prefix_space = True
    if any(n.get("type") in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer") for n in pres) \
            or mtype == "WordPiece":
        lossy.append("drop_whitespace")
    if any(n.get("type") == "Split" and n.get("behavior") == "Removed" for n in pres):
        lossy.append("split_removed")

    # model vocabulary -> (token string, id)
    if mtype in ("BPE", "WordPiece"):
        vocab = model["vocab"]
        if not isinstance(vocab, dict):
            raise VocabError(f"{path}: model.vocab must map token -> id")
        items = list(vocab.items())
    elif mtype == "Unigram":
        entries = model["vocab"]
        if not isinstance(entries, list):
            raise VocabError(f"{path}: the Unigram model.vocab must be a list of [piece, score]")
        for k, e in enumerate(entries):
            if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                    and isinstance(e[1], (int, float)) and not isinstance(e[1], bool) and math.isfinite(e[1])):
                raise VocabError(f"{path}: Unigram entry {k} is not [piece, finite score]: {str(e)[:60]}")
        items = [(entry[0], i) for i, entry in enumerate(entries)]
        vocab = {}
    else:
        raise VocabError(f"{path}: unsupported tokenizer model type {mtype!r} "
                         f"(supported: BPE, Unigram, WordPiece)")
    added = data.get("added_tokens") or []
    added_ids = _check_entries(path, mtype, items, added)
    max_id = max([i for _, i in items] + added_ids, default=-1)
    if max_id < 0:
        raise VocabError(f"{path}: the vocabulary is empty")
    n = check_id_space(path, max_id, len(items) + len(added))
    if mtype == "BPE":
        data, text, dropout = _without_dropout(path, data, text)
        model = data["model"]
    pieces: list[bytes | None] = [None] * n
    word_start = None
    byte_fallback = bool(model.get("byte_fallback"))
    byte_ids: dict[int, int] = {}
    if mtype == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        word_start = np.zeros(n, dtype=np.bool_)
        for s, i in items:
            if s.startswith(prefix) and len(s) > len(prefix):
                pieces[i] = s[len(prefix):].encode("utf-8")
            else:
                pieces[i] = s.encode("utf-8")
                word_start[i] = True
        kind = "wordpiece"
    elif byte_level:
        for s, i in items:
            pieces[i] = gpt2_token_bytes(s)
        kind = "byte_bpe"
    else:
        for s, i in items:
            m = _BYTE_PIECE.fullmatch(s) if byte_fallback else None
            if m is not None:
                b = int(m.group(1), 16)
                pieces[i] = bytes([b])
                byte_ids.setdefault(b, i)
            else:
                pieces[i] = (s.replace(_SPACE_MARK, " ") if metaspace else s).encode("utf-8")
        kind = "unigram" if mtype == "Unigram" else "sentencepiece_bpe"
    if mtype == "BPE":
        suffix = model.get("end_of_word_suffix") or ""
        cont = model.get("continuing_subword_prefix") or ""
        if suffix or cont:
            for s, i in items:
                b = pieces[i]
                if suffix and s.endswith(suffix) and len(s) > len(suffix):
                    b = b[: len(b) - len(suffix.encode())]
                if cont and s.startswith(cont) and len(s) > len(cont):
                    b = b[len(cont.encode()):]
                pieces[i] = b

    special_text: dict[int, str] = {}
    for a in added:
        i = int(a["id"])
        content = a["content"]
        if a.get("special", False):
            special_text[i] = content
        else:
            pieces[i] = content.encode("utf-8")
            if word_start is not None:
                word_start[i] = True
    unk_id = None
    if mtype == "Unigram":
        if model.get("unk_id") is not None:
            unk_id = model["unk_id"]
            if not is_int(unk_id) or not 0 <= unk_id < len(items):
                raise VocabError(f"{path}: Unigram unk_id {unk_id!r} is not the id of one of its {len(items):,} pieces")
    elif model.get("unk_token") is not None:
        unk_id = vocab.get(model["unk_token"])
    if unk_id is not None and unk_id not in special_text:
        if mtype == "Unigram":
            special_text[unk_id] = next((s for s, i in items if i == unk_id), "<unk>")
        else:
            special_text[unk_id] = model["unk_token"]
    if word_start is not None:
        for i in special_text:
            word_start[i] = False

    ids_of = {t: i for i, t in special_text.items()}
    explicit: dict[str, list[int]] = {}
    if unk_id is not None:
        explicit["unk"] = [unk_id]
    config = config_path if config_path is not None else path.parent / "tokenizer_config.json"
    for role, texts in _config_roles(config).items():
        explicit.setdefault(role, [])[:0] = [ids_of[t] for t in texts if t in ids_of]
    for role, ids in _template_roles(data.get("post_processor"), ids_of).items():
        explicit.setdefault(role, []).extend(ids)
    roles = assign_roles(special_text, explicit)

    merges_list = None
    if mtype == "BPE":  # parsed and checked on first use, before the library builds its BPE (it may panic)
        merges_list = _Once(lambda: _parse_merges(path, model.get("merges") or [], vocab,
                                                  model.get("continuing_subword_prefix") or ""))

    backend = HFBackend(path, text, data.get("normalizer"), pre, byte_level=byte_level,
                        needs_raw_copy=prefix_space, byte_ids=byte_ids, unk_id=unk_id, before_load=merges_list,
                        added=[(a["content"], a["id"]) for a in added])
    normalizer = "+".join(norm_steps) if norm_steps else None
    return Vocab(name=name, source=str(source or path), kind=kind, pieces=pieces,
                 special_text=special_text, roles=roles, backend=backend, prefix_space=prefix_space,
                 normalizer=normalizer, lossy_normalizer="+".join(lossy) if lossy else None,
                 merges=merges_list, word_start=word_start, unk_id=unk_id,
                 details={"format": "tokenizer.json", "model": mtype, "byte_fallback": byte_fallback,
                          "ignore_merges": bool(model.get("ignore_merges", False)),
                          **({"dropout_ignored": dropout} if mtype == "BPE" and dropout else {})})


class _Once:
    """A memoised thunk (the merge list: parsed and checked once, by whoever needs it first)."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn = fn
        self._done = False
        self._value = None

    def __call__(self):
        if not self._done:
            self._value = self._fn()
            self._done = True
        return self._value


def _check_entries(path: Path, mtype: str, items: list, added: Any) -> list[int]:
    """Ids, token strings and added tokens of a tokenizer.json, before any table is sized from
    them: integer ids, one token per id, valid UTF-8 of bounded length, added tokens that agree
    with the model on the ids they share. Returns the added tokens' ids."""
    by_id: dict[int, str] = {}
    for s, i in items:
        if not is_int(i) or i < 0:
            raise VocabError(f"{path}: token {str(s)[:40]!r} has id {i!r}; ids must be non-negative integers")
        utf8_piece(path, f"token {i}", s)
        other = by_id.setdefault(i, s)
        if other is not s:
            raise VocabError(f"{path}: tokens {other[:40]!r} and {s[:40]!r} share id {i}")
    if not isinstance(added, list):
        raise VocabError(f"{path}: added_tokens must be a list")
    ids = []
    seen: dict[int, str] = {}
    for k, a in enumerate(added):
        if not isinstance(a, dict) or not is_int(a.get("id")) or a["id"] < 0:
            raise VocabError(f"{path}: added token {k} has no non-negative integer id")
        i, content = a["id"], a.get("content")
        utf8_piece(path, f"added token {i}", content)
        if not content:
            raise VocabError(f"{path}: added token {i} has empty content")
        if seen.setdefault(i, content) != content:
            raise VocabError(f"{path}: added tokens {seen[i][:40]!r} and {content[:40]!r} share id {i}")
        if i in by_id and by_id[i] != content:
            raise VocabError(f"{path}: added token {content[:40]!r} has id {i}, which the model gives to "
                             f"{by_id[i][:40]!r}")
        ids.append(i)
    return ids


def _without_dropout(path: Path, data: dict, text: str) -> tuple[dict, str, Any]:
    """BPE dropout makes encoding random: ctalign maps the canonical (dropout-free) tokenization,
    so the library is given the file with dropout off. Returns (data, text, the dropout value)."""
    dropout = data["model"].get("dropout")
    if dropout is None or dropout == 0:
        return data, text, None
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise VocabError(f"{path}: BPE dropout {dropout!r} is not a probability")
    data = dict(data)
    data["model"] = {**data["model"], "dropout": None}
    return data, json.dumps(data), dropout


def _parse_merges(path: Path, raw: list, vocab: dict[str, int], prefix: str = "") -> list[tuple[int, int]]:
    # 10^5 small lists: the cyclic GC would walk the heap again and again (none can form a cycle).
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _parse_merges_checked(path, raw, vocab, prefix)
    finally:
        if gc_was_on:
            gc.enable()


def _parse_merges_checked(path: Path, raw: list, vocab: dict[str, int], prefix: str) -> list[tuple[int, int]]:
    """(left, right) ids per merge; both parts and the result must be tokens, each pair once. With a
    ``continuing_subword_prefix`` the right part carries it and the result is left + right without it
    (the library slices the prefix off; a right part without it makes it panic)."""
    if not isinstance(raw, list):
        raise VocabError(f"{path}: model.merges must be a list")
    if not isinstance(prefix, str):
        raise VocabError(f"{path}: continuing_subword_prefix must be a string")
    get = vocab.get
    cut = len(prefix)
    if not cut and all(map(str.__instancecheck__, raw)):  # the usual case, in C-level passes
        splits = list(map(str.split, raw, repeat(" ")))
        if set(map(len, splits)) <= {2}:
            lefts, rights = zip(*splits) if splits else ((), ())
            a, b = list(map(get, lefts)), list(map(get, rights))
            if None not in a and None not in b and None not in map(get, map(str.__add__, lefts, rights)):
                out = list(zip(a, b))
                if len(set(out)) == len(out):
                    return out
    out = []  # the checks one by one, naming the first bad merge
    for k, m in enumerate(raw):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, list):
            parts = m
        else:
            raise VocabError(f"{path}: merge {k} ({str(m)[:60]!r}) is not a pair of tokens")
        if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise VocabError(f"{path}: merge {k} ({str(m)[:60]!r}) is not a pair of tokens")
        left, right = parts
        if cut and not (right.startswith(prefix) and len(right) > cut):
            raise VocabError(f"{path}: merge {k} ({str(m)[:60]!r}): its right part lacks the "
                             f"continuing_subword_prefix {prefix!r}")
        a, b, r = get(left), get(right), get(left + right[cut:])
        if a is None or b is None:
            raise VocabError(f"{path}: merge {k} ({str(m)[:60]!r}) names a token that is not in the vocabulary")
        if r is None:
            raise VocabError(f"{path}: merge {k} ({str(m)[:60]!r}): its result {(left + right[cut:])[:60]!r} "
                             f"is not in the vocabulary")
        out.append((a, b))
    if len(set(out)) != len(out):
        seen: dict[tuple[int, int], int] = {}
        for k, pair in enumerate(out):
            if pair in seen:
                raise VocabError(f"{path}: merge {k} repeats merge {seen[pair]} ({raw[k]!r}); the library "
                                 f"and a merge list disagree on its rank")
            seen[pair] = k
    return out


# ---- GPT-2 encoder.json + vocab.bpe -----------------------------------------------------------
_SPECIAL_LIKE = re.compile(r"<\|[^|]+\|>")


def load_gpt2_pair(encoder_path: Path, merges_path: Path, *, name: str,
                   encoder: dict | None = None) -> Vocab:
    """GPT-2 style byte-level BPE: token -> id JSON plus the merge list, encoded by a
    ``tokenizers`` BPE built from both (GPT-2 pre-tokenizer regex, no prefix space)."""
    if encoder is None:
        _, encoder = _read_json(encoder_path)
    if not isinstance(encoder, dict) or not encoder or not all(isinstance(v, int) for v in encoder.values()):
        raise VocabError(f"{encoder_path}: expected a JSON object mapping token -> id")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise VocabError(f"{merges_path}: not a UTF-8 text file") from None
    merges = []
    for k, line in enumerate(lines):
        if not line or (k == 0 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise VocabError(f"{merges_path}: line {k + 1} is not a merge 'left right': {line[:60]!r}")
        merges.append(parts)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for t, i in encoder.items() if _SPECIAL_LIKE.fullmatch(t)]
    cfg = encoder_path.parent / "tokenizer_config.json"
    if cfg.is_file():
        _, c = _read_json(cfg)
        known = {a["id"] for a in added}
        for key, a in ((c.get("added_tokens_decoder") or {}) if isinstance(c, dict) else {}).items():
            if int(key) not in known and isinstance(a, dict) and "content" in a:
                added.append({"id": int(key), "content": a["content"], "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False,
                              "special": bool(a.get("special", True))})
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": encoder, "merges": [" ".join(p) for p in merges]},
    }
    vocab = load_hf_tokenizer(merges_path, json.dumps(data), data, name=name, source=encoder_path,
                              config_path=cfg)
    vocab.details["format"] = "gpt2 encoder+merges"
    vocab.details["merges_file"] = str(merges_path)
    return vocab
