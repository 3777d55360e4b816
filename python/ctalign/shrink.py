"""``shrink_vocab``: a smaller BPE tokenizer made of a teacher's byte tokens and its first merges.

The student of likelihood scoring on the edge: it tokenizes every text exactly as the teacher does,
with each teacher token unrolled down its merge tree to student tokens, so the teacher -> student
map is in the ``subset`` regime (``docs/design.md``, "Regimes").

    >>> info = shrink_vocab("asset:llama3", 8000, "out/llama3-8k")   # doctest: +SKIP
    >>> load_vocab("out/llama3-8k").kind                              # doctest: +SKIP
    'byte_bpe'

Written: ``DIR/tokenizer.json`` (HF ``tokenizers`` BPE over the GPT-2 byte alphabet) and
``DIR/tokenizer_config.json`` (special roles). Regular tokens: the teacher's 256 byte tokens, then
merge results in the teacher's merge order until there are N; their ids keep the teacher's relative
order. The teacher's special tokens follow, re-indexed from N in teacher id order.

Teachers: byte-level BPE ``tokenizer.json`` (the normalizer, pre-tokenizer, post-processor and
decoder are kept; the merge list is cut after the merge that creates the N-th token), GPT-2
encoder/merges, tiktoken rank files and Tekken (an equivalent HF JSON: ``Split`` on the encoding's
regex, with the non-possessive ``\\p{N}{1,3}`` HF needs, then ``ByteLevel`` without its own regex;
``ignore_merges`` like tiktoken; every split of a kept token into two kept tokens of lower rank is a
merge, ordered by the rank of the result, so HF BPE merges what tiktoken would).
Cost: one pass over the teacher's merges, O(V + merges) in Python (well under a second).
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctalign.errors import CtalignError

__all__ = ["shrink_vocab"]

_SUPPORTED = ("byte_bpe", "tiktoken", "tekken")


def _hf_pattern(pattern: str) -> str:
    """tiktoken regex -> the HF (Oniguruma) equivalent: ``{n,m}+`` is possessive in tiktoken but a
    repetition of the group in Oniguruma, so drop the ``+`` (tokenizers.md)."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _kept_from_merge_list(teacher, merges: list[tuple[int, int]], bases: list[int], n: int):
    """HF merge list: take merges in order until n regular tokens exist. Returns (kept ids, merges
    as (left, right) ids)."""
    kept = dict.fromkeys(bases)
    chosen = []
    tb = teacher.token_bytes
    for left, right in merges:
        if left not in kept or right not in kept:
            continue  # a merge of a piece BPE never creates here: it cannot fire
        result = teacher.ids_of_bytes(tb(left) + tb(right))
        if not result:
            continue
        r = result[0]
        if r not in kept:
            if len(kept) == n:
                break
            kept[r] = None
        chosen.append((left, right))
    return list(kept), chosen


def _kept_from_ranks(teacher, mt, bases: list[int], n: int):
    """tiktoken ranks: tokens created by a merge, in rank order, until n regular tokens exist; the
    merges are every split of a kept token into two kept tokens of lower rank."""
    rank = np.asarray(mt.rank)
    left = np.asarray(mt.left)
    candidates = np.flatnonzero(left >= 0)
    candidates = candidates[np.argsort(rank[candidates], kind="stable")]
    kept_list = list(bases) + [int(t) for t in candidates[: max(n - len(bases), 0)]]
    priority = {t: (-1 if t in bases else int(rank[t])) for t in kept_list}
    by_bytes = {teacher.token_bytes(t): t for t in kept_list}
    chosen = []
    for t in kept_list:
        if t in bases:
            continue
        b = teacher.token_bytes(t)
        for k in range(1, len(b)):
            x, y = by_bytes.get(b[:k]), by_bytes.get(b[k:])
            if x is not None and y is not None and priority[x] < priority[t] and priority[y] < priority[t]:
                chosen.append((priority[t], k, x, y))
    chosen.sort()
    return kept_list, [(x, y) for _, _, x, y in chosen]


def _remap_post_processor(node: Any, new_id: dict[str, int]) -> Any:
    """Replace special-token ids inside an HF post-processor by their new ids (matched by text)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list) and isinstance(node.get("tokens"), list):
                out[k] = [new_id.get(tok, i) for tok, i in zip(node["tokens"], v)]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                out[k] = [v[0], new_id.get(v[0], v[1])]
            else:
                out[k] = _remap_post_processor(v, new_id)
        return out
    if isinstance(node, list):
        return [_remap_post_processor(v, new_id) for v in node]
    return node


def _pipeline(teacher) -> dict[str, Any]:
    """normalizer / pre_tokenizer / post_processor / decoder / ignore_merges of the shrunk tokenizer."""
    byte_level_decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    details = getattr(teacher, "details", {}) or {}
    if teacher.kind == "byte_bpe" and details.get("format") == "tokenizer.json":
        with open(teacher.source, encoding="utf-8") as f:
            src = json.load(f)
        return {"normalizer": src.get("normalizer"), "pre_tokenizer": src.get("pre_tokenizer"),
                "post_processor": src.get("post_processor"), "decoder": src.get("decoder") or byte_level_decoder,
                "ignore_merges": bool((src.get("model") or {}).get("ignore_merges", False))}
    if teacher.kind == "byte_bpe":  # GPT-2 encoder.json + vocab.bpe
        return {"normalizer": None,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": bool(teacher.prefix_space),
                                  "trim_offsets": True, "use_regex": True},
                "post_processor": None, "decoder": byte_level_decoder, "ignore_merges": False}
    pattern = details.get("pattern")
    if not pattern:
        raise CtalignError(f"{teacher.source}: the split pattern of this {teacher.kind} vocabulary is unknown")
    return {"normalizer": {"type": "NFC"} if teacher.normalizer == "nfc" else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _hf_pattern(pattern)}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None, "decoder": byte_level_decoder, "ignore_merges": True}


def shrink_vocab(teacher, vocab_size: int, out_dir, *, pattern: str | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Write ``out_dir/tokenizer.json`` (+ ``tokenizer_config.json``) with ``vocab_size`` regular
    tokens: the teacher's byte tokens and first merges; specials kept after them. ``teacher``: a
    Vocab or a ``load_vocab`` spec (``asset:NAME`` too). Returns a summary dict."""
    from ctalign.alignment_map import _load
    from ctalign.vocab.base import gpt2_alphabet

    say = progress or (lambda _m: None)
    say(f"loading teacher {teacher}")
    teacher = _load(teacher, pattern)
    if teacher.kind not in _SUPPORTED:
        raise CtalignError(f"{teacher.source}: shrink-vocab needs a byte-level BPE teacher (byte_bpe, tiktoken, "
                           f"tekken); {teacher.name!r} is {teacher.kind}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise CtalignError(f"vocab size must be an integer, got {vocab_size!r}")
    mt = teacher.merge_table
    bases = sorted({int(b) for b in np.asarray(mt.base_token) if b >= 0})
    n_regular_max = len(bases) + int(np.count_nonzero(np.asarray(mt.left) >= 0))
    if not len(bases) <= vocab_size <= n_regular_max:
        raise CtalignError(f"--vocab-size {vocab_size}: must lie in [{len(bases)}, {n_regular_max}] for "
                           f"{teacher.name!r} ({len(bases)} byte tokens + {n_regular_max - len(bases):,} merges)")
    say(f"choosing {vocab_size:,} regular tokens")
    merges = teacher.merges if teacher.kind == "byte_bpe" else None
    if merges:
        kept, chosen = _kept_from_merge_list(teacher, merges, bases, int(vocab_size))
    else:
        kept, chosen = _kept_from_ranks(teacher, mt, bases, int(vocab_size))
    if len(kept) != vocab_size:
        raise CtalignError(f"--vocab-size {vocab_size}: the teacher's merge list creates only {len(kept):,} tokens")

    kept.sort()
    new_id = {t: k for k, t in enumerate(kept)}
    vocab = {gpt2_alphabet(teacher.token_bytes(t)): new_id[t] for t in kept}
    merge_strings = [f"{gpt2_alphabet(teacher.token_bytes(a))} {gpt2_alphabet(teacher.token_bytes(b))}"
                     for a, b in chosen]
    special_ids = sorted(teacher.specials)
    special_new = {teacher.special_text[t]: len(kept) + k for k, t in enumerate(special_ids)}
    added = [{"id": special_new[teacher.special_text[t]], "content": teacher.special_text[t], "single_word": False,
              "lstrip": False, "rstrip": False, "normalized": False, "special": True} for t in special_ids]
    pipe = _pipeline(teacher)
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": copy.deepcopy(pipe["normalizer"]),
        "pre_tokenizer": copy.deepcopy(pipe["pre_tokenizer"]),
        "post_processor": _remap_post_processor(pipe["post_processor"], special_new),
        "decoder": pipe["decoder"],
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pipe["ignore_merges"], "vocab": vocab, "merges": merge_strings},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False,
              "ctalign_shrunk_from": {"name": teacher.name, "kind": teacher.kind, "fingerprint": teacher.fingerprint,
                                      "vocab_size": int(vocab_size)}}
    for role in ("bos", "eos", "pad", "unk"):
        if role in teacher.special_ids:
            config[f"{role}_token"] = teacher.special_text[teacher.special_ids[role]]

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CtalignError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    say(f"writing {out / 'tokenizer.json'}")
    _write_text(out / "tokenizer.json", json.dumps(doc, ensure_ascii=False, indent=1))
    _write_text(out / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=1))
    # The file must load in HF tokenizers as written.
    from tokenizers import Tokenizer
    Tokenizer.from_file(str(out / "tokenizer.json"))
    return {"tokenizer_json": str(out / "tokenizer.json"), "tokenizer_config": str(out / "tokenizer_config.json"),
            "teacher": {"name": teacher.name, "kind": teacher.kind, "size": len(teacher)},
            "regular_tokens": len(kept), "base_tokens": len(bases), "merges": len(chosen),
            "specials": len(special_ids), "size": len(kept) + len(special_ids)}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
