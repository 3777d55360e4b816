"""Tables the ops read (token groups, sorted orders, trie nodes), built once per vocabulary or map and
cached as torch tensors on it, per device."""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from ctalign.errors import MapMismatchError


_TABLE_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_TABLE_CACHE_STRONG: dict[int, tuple[Any, dict]] = {}


def _cache_of(obj) -> dict:
    store = getattr(obj, "__dict__", None)
    if isinstance(store, dict):
        return store.setdefault("_ctalign_op_tables", {})
    try:
        return _TABLE_CACHE.setdefault(obj, {})
    except TypeError:
        return _TABLE_CACHE_STRONG.setdefault(id(obj), (obj, {}))[1]


class _Tables:
    """Integer tables of one trie / map as torch tensors: host copies plus one copy per device."""

    def __init__(self, host: dict[str, torch.Tensor], **sizes: int):
        self.host = host
        self.sizes = sizes
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {torch.device("cpu"): host}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        d = self._on.get(device)
        if d is None:
            d = {k: v.to(device) for k, v in self.host.items()}
            self._on[device] = d
        return d

    def derived(self, name: str, device: torch.device, build) -> torch.Tensor:
        """A table computed on first use from the host tables (``build(host) -> tensor``), then kept
        with the others (host copy plus one per device)."""
        if name not in self.host:
            self.host[name] = build(self.host)
        d = self.on(device)
        if name not in d:
            d[name] = self.host[name].to(device)
        return d[name]

    def __getattr__(self, name: str) -> int:
        try:
            return self.__dict__["sizes"][name]
        except KeyError:
            raise AttributeError(name) from None


_TRIE_FIELDS = ("order", "rank", "first_symbol", "node_lo", "node_hi", "node_end", "child_start", "child_node",
                "node_symbol")


def _trie_tables(fields: dict[str, np.ndarray], n_symbols: int) -> _Tables:
    def t(name, dtype):
        return torch.from_numpy(np.array(fields[name], copy=True)).to(dtype)

    host = {
        "order": t("order", torch.int32),
        "rank": t("rank", torch.int64),
        "group": t("first_symbol", torch.int32),
        "node_lo": t("node_lo", torch.int64),
        "node_hi": t("node_hi", torch.int64),
        "node_end": t("node_end", torch.int64),
        "child_start": t("child_start", torch.int64),
        "child_node": t("child_node", torch.int64),
        "node_symbol": t("node_symbol", torch.int64),
    }
    tables = _Tables(host, n_tokens=len(fields["rank"]), n_members=len(fields["order"]),
                     n_nodes=len(fields["node_lo"]), n_symbols=n_symbols)
    tables.nodes_np = tuple(np.ascontiguousarray(fields[f], dtype=np.int32) for f in (
        "child_start", "child_node", "node_lo", "node_hi", "node_end", "node_symbol"))
    return tables


def _trie_fields_of(trie) -> dict[str, np.ndarray]:
    out = {}
    for f in _TRIE_FIELDS:
        v = getattr(trie, f)
        out[f] = np.asarray(v() if callable(v) else v)
    return out


def _byte_trie(vocab) -> _Tables:
    """Teacher byte-trie tables of a Vocab, an AlignmentMap (its teacher side) or a trie object."""
    cache = _cache_of(vocab)
    tables = cache.get("byte_trie")
    if tables is None:
        if callable(getattr(vocab, "trie_arrays", None)):
            fields = {f: np.asarray(a) for f, a in vocab.trie_arrays("teacher_trie").items()}
        elif hasattr(vocab, "node_lo") and hasattr(vocab, "order"):
            fields = _trie_fields_of(vocab)
        elif hasattr(vocab, "trie"):
            fields = _trie_fields_of(vocab.trie)
        else:
            raise TypeError(f"expected a Vocab, an AlignmentMap or a byte SequenceTrie, got {type(vocab).__name__}")
        n_symbols = int(getattr(vocab, "n_symbols", 256) if hasattr(vocab, "node_lo") else 256)
        if n_symbols != 256:
            raise ValueError(f"expected a byte trie (256 symbols), got one over {n_symbols} symbols")
        tables = cache["byte_trie"] = _trie_tables(fields, 256)
    return tables


def _map_tables(amap) -> tuple[_Tables, _Tables, _Tables]:
    """(map tables, teacher byte trie, dec trie) of an AlignmentMap."""
    if not (hasattr(amap, "first_student") and callable(getattr(amap, "trie_arrays", None))):
        raise TypeError(f"expected an AlignmentMap (ctalign.build_map), got {type(amap).__name__}")
    cache = _cache_of(amap)
    tables = cache.get("map")
    if tables is None:
        first_student = np.asarray(amap.first_student)
        cover_lo, cover_hi = np.asarray(amap.cover_lo), np.asarray(amap.cover_hi)
        n_student = len(cover_lo)
        host = {
            "group": torch.from_numpy(np.array(first_student, copy=True)).to(torch.int32),
            "cover_lo": torch.from_numpy(np.array(cover_lo, copy=True)).to(torch.int32).reshape(1, -1),
            "cover_hi": torch.from_numpy(np.array(cover_hi, copy=True)).to(torch.int32).reshape(1, -1),
        }
        tables = cache["map"] = _Tables(host, n_teacher=len(first_student), n_student=n_student)
        dec = {f: np.asarray(a) for f, a in amap.trie_arrays("dec_trie").items()}
        cache["dec_trie"] = _trie_tables(dec, max(n_student, 1))
    return tables, _byte_trie(amap), cache["dec_trie"]


def _check_map_vocabs(op: str, amap, teacher, student) -> None:
    for side, vocab, expected in (("teacher", teacher, getattr(amap, "teacher_fingerprint", None)),
                                  ("student", student, getattr(amap, "student_fingerprint", None))):
        if vocab is None or expected is None:
            continue
        got = getattr(vocab, "fingerprint", None)
        if got != expected:
            raise MapMismatchError(f"{op}: the map was built for another {side} vocabulary than "
                                   f"{getattr(vocab, 'name', vocab)!r} (fingerprints differ)")
