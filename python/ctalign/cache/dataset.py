"""Reading a teacher cache: :class:`TeacherCache` (a map-style dataset over its examples) and
:class:`CachedDistillationCollator` (student tokenization, alignment and batched ``TopK`` teacher rows).

Shards are memory-mapped, one example decoded per ``__getitem__``; the dataset pickles without its
maps, so DataLoader workers (fork or spawn) map the files again in their own process.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ctalign.cache.codec import RowCodec
from ctalign.cache.shard import CacheError, Shard, file_sha256
from ctalign.cache.writer import FORMAT, VERSION, merge_index
from ctalign.data import DistillationCollator, Example, encode_example


def _load_index(root: Path) -> dict:
    path = root / "index.json"
    if not path.exists():
        if not root.is_dir():
            raise CacheError(f"{root}: no such teacher cache folder")
        if any(root.glob("index-rank*-of-*.json")):
            path = merge_index(root)
        else:
            raise CacheError(f"{root}: no index.json (not a teacher cache, or its run never finished a shard)")
    try:
        index = json.loads(path.read_text())
        cfg = index["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{path}: corrupt index ({e})") from None
    if cfg.get("format") != FORMAT:
        raise CacheError(f"{path}: not a ctalign teacher cache index")
    if cfg.get("version") != VERSION:
        raise CacheError(f"{path}: cache format version {cfg.get('version')}, this ctalign reads {VERSION}")
    return index


class TeacherCache:
    """The examples of a cache written by :func:`~ctalign.cache.cache_teacher`.

    ``top_k``: read the first ``top_k`` entries of each row (at most the cache's k; entries are in
    decreasing probability, so this is the top ``top_k``). ``verify``: check every shard's size and
    sha256 against the index when the cache is opened (one streaming read per shard).
    ``complete``: refuse a cache whose run has not written every shard.

    An item is a dict: ``text`` (str), ``response_start`` (byte offset), ``whole_text``, ``truncated``,
    ``teacher_ids`` int64 [T], ``teacher_loss_mask`` bool [T], ``topk_indices`` int64 [T, k],
    ``topk_logprobs`` float32 [T, k], ``kept_logmass`` float32 [T] and ``own_logprob`` float32 [T]
    (log p of the teacher's own next token at each row; -inf at the last row).
    """

    def __init__(self, path, *, top_k: int | None = None, verify: bool = True, complete: bool = True):
        self.root = Path(path)
        self.index = _load_index(self.root)
        cfg = self.index["config"]
        self.config = cfg
        c = cfg["codec"]
        self.codec = RowCodec(int(c["k"]), int(c["vocab_size"]), c["logprob_codec"])
        if top_k is not None and not 1 <= int(top_k) <= self.codec.k:
            raise CacheError(f"{self.root}: top_k={top_k} asked, the cache holds k = {self.codec.k}")
        self.top_k = int(top_k) if top_k is not None else self.codec.k
        shards = self.index["shards"]
        n_shards = (cfg["dataset"]["examples"] + cfg["shard_examples"] - 1) // cfg["shard_examples"]
        if complete and len(shards) != n_shards:
            raise CacheError(f"{self.root}: incomplete cache, {len(shards)} of {n_shards} shards written "
                             f"(run cache-teacher again with the same arguments to finish it)")
        self._entries = shards
        for s in shards:
            p = self.root / s["file"]
            if verify:
                if not p.is_file():
                    raise CacheError(f"{p}: shard listed in the index is missing")
                if p.stat().st_size != s["bytes"]:
                    raise CacheError(f"{p}: shard is {p.stat().st_size} bytes, the index says {s['bytes']} "
                                     f"(truncated or replaced)")
                if file_sha256(p) != s["sha256"]:
                    raise CacheError(f"{p}: checksum mismatch (the shard was changed after it was written)")
        self._starts = [0]
        for s in shards:
            self._starts.append(self._starts[-1] + int(s["examples"]))
        self._shards: dict[int, Shard] = {}

    # ---- identity ---------------------------------------------------------------------------------
    @property
    def teacher_fingerprint(self) -> str:
        return self.config["teacher"]["fingerprint"]

    @property
    def temperature(self) -> float:
        return float(self.config["temperature"])

    def check_teacher(self, vocab_or_map, what: str = "map") -> None:
        """Raises when ``vocab_or_map`` (a Vocab or an AlignmentMap) is not for this cache's teacher."""
        fp = getattr(vocab_or_map, "teacher_fingerprint", None) or getattr(vocab_or_map, "fingerprint", None)
        if fp is None:
            raise TypeError(f"check_teacher() takes a Vocab or an AlignmentMap, not {type(vocab_or_map).__name__}")
        if fp != self.teacher_fingerprint:
            raise CacheError(f"{self.root}: the cache was made with teacher tokenizer "
                             f"{self.config['teacher']['name']} (fingerprint {self.teacher_fingerprint[:12]}), "
                             f"the {what} is for another teacher tokenizer ({fp[:12]})")

    # ---- items ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, j: int) -> Shard:
        sh = self._shards.get(j)
        if sh is None:
            e = self._entries[j]
            sh = Shard(self.root / e["file"], size=e["bytes"])
            self._shards[j] = sh
        return sh

    def __getitem__(self, i: int) -> dict:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"TeacherCache indices are integers, got {type(i).__name__}")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of a cache of {len(self)}")
        j = bisect.bisect_right(self._starts, i) - 1
        sh = self._shard(j)
        local = i - self._starts[j]
        off = sh["token_offsets"]
        lo, hi = int(off[local]), int(off[local + 1])
        rows = {name: sh["row_" + name][lo:hi] for name in ("ids", "codes", "kept", "hi", "lo")
                if "row_" + name in sh}
        ids, lp = self.codec.decode(rows)
        kept = np.asarray(rows["kept"], dtype=np.float32)
        if self.top_k < self.codec.k:
            ids, lp = ids[:, : self.top_k], lp[:, : self.top_k]
            with np.errstate(divide="ignore"):
                kept = np.log(np.exp(lp.astype(np.float64)).sum(axis=1)).astype(np.float32)
        toff = sh["text_offsets"]
        text = bytes(sh["text"][int(toff[local]):int(toff[local + 1])])
        try:
            text_str = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CacheError(f"{sh.path}: example {i} holds text that is not UTF-8 (corrupt shard)") from None
        return {
            "text": text_str, "response_start": int(sh["response_start"][local]),
            "whole_text": bool(sh["whole_text"][local]), "truncated": bool(sh["truncated"][local]),
            "teacher_ids": np.asarray(sh["teacher_ids"][lo:hi], dtype=np.int64),
            "teacher_loss_mask": np.asarray(sh["loss_mask"][lo:hi], dtype=bool),
            "topk_indices": ids, "topk_logprobs": lp, "kept_logmass": kept,
            "own_logprob": np.asarray(sh["own_logprob"][lo:hi], dtype=np.float32),
        }

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state


class CachedDistillationCollator(DistillationCollator):
    """Batches cached examples for the losses: the student's tokenization of each cached text, the
    alignment, and the teacher's cached rows as ``TopK`` ``[B, Lt, k]`` (``batch["teacher_topk"]``; pass
    it where a loss takes teacher logits), with ``teacher_own_logprob`` ``[B, Lt]`` and
    ``teacher_kept_logmass`` ``[B, Lt]``. Padding rows hold a uniform distribution over ids ``0..k-1``
    (finite, and masked out by the loss masks). ``max_length`` cuts the student side (and the teacher
    rows with it) at a common boundary, as :class:`~ctalign.data.DistillationCollator` does.

    ``cache``: the :class:`TeacherCache` (checked against the map's teacher tokenizer).
    """

    def __init__(self, amap=None, *, cache: TeacherCache | None = None, **kw):
        if kw.get("return_tensors", "pt") != "pt":
            raise ValueError("CachedDistillationCollator returns torch tensors (its teacher rows are TopK)")
        super().__init__(amap, **kw)
        if cache is not None:
            cache.check_teacher(self.teacher_vocab, "teacher vocabulary")
        self.cache = cache

    def __call__(self, batch: Sequence[dict]) -> dict:
        import torch

        from ctalign.ops import TopK

        if len(batch) == 0:
            raise ValueError("empty batch")
        sv = self.student_vocab
        t_rows, s_rows, texts, starts, tops = [], [], [], [], []
        for n, item in enumerate(batch):
            if not isinstance(item, dict) or "topk_indices" not in item:
                raise TypeError(f"example {n}: expected an item of a TeacherCache, got {type(item).__name__}")
            tb = item["text"].encode("utf-8")
            rs = item["response_start"]
            ex = Example(tb[:rs].decode("utf-8"), tb[rs:].decode("utf-8"), item["whole_text"])
            t_ids = [int(x) for x in item["teacher_ids"]]
            t_mask = [int(x) for x in item["teacher_loss_mask"]]
            s_ids, s_mask = encode_example(sv, ex, self.add_bos, self.add_eos and not item["truncated"])
            text = ex.text
            if self._too_long(len(t_ids), len(s_ids)):
                t_ids, t_mask, s_ids, s_mask, text = self._truncate(ex, t_ids, t_mask, s_ids, s_mask)
            n_t = len(t_ids)
            tops.append((item["topk_indices"][:n_t], item["topk_logprobs"][:n_t], item["own_logprob"][:n_t],
                         item["kept_logmass"][:n_t]))
            t_rows.append((t_ids, t_mask))
            s_rows.append((s_ids, s_mask))
            texts.append(text)
            starts.append(rs)
        out = self._batch(t_rows, s_rows, texts, starts)
        B, Lt = out["teacher_input_ids"].shape
        k = tops[0][0].shape[1]
        idx = np.tile(np.arange(k, dtype=np.int64), (B, Lt, 1))
        lp = np.full((B, Lt, k), -np.log(k), dtype=np.float32)
        own = np.zeros((B, Lt), dtype=np.float32)
        kept = np.zeros((B, Lt), dtype=np.float32)
        for b, (ti, tl, to, tk) in enumerate(tops):
            n = ti.shape[0]
            idx[b, :n], lp[b, :n], own[b, :n], kept[b, :n] = ti, tl, to, tk
        out["teacher_topk"] = TopK(torch.from_numpy(idx), torch.from_numpy(lp))
        out["teacher_own_logprob"] = torch.from_numpy(own)
        out["teacher_kept_logmass"] = torch.from_numpy(kept)
        return out

