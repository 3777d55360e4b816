"""Running a teacher once over a dataset and writing its top-k rows: :func:`cache_teacher`.

Output folder: ``index.json`` (or, under several ranks, one ``index-rank{r}-of-{w}.json`` per rank,
merged by :func:`merge_index`) and ``shard-{i:05d}.ctc`` files. Shard ``i`` always holds examples
``[i * shard_examples, (i + 1) * shard_examples)`` and is batched the same way whatever ran before,
so a killed run started again with the same arguments skips the shards its index lists and writes the
same bytes an uninterrupted run writes. Rank ``r`` of ``w`` writes the shards ``i`` with
``i % w == r``. Shards and indexes are written atomically (temporary file, fsync, rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ctalign.artifact import _write_atomic
from ctalign.cache.codec import RowCodec
from ctalign.cache.shard import CacheError, write_shard
from ctalign.cache.teachers import resolve_teacher
from ctalign.data import Example, _as_example, encode_example

FORMAT = "ctalign-teacher-cache"
VERSION = 1


# ---- examples -------------------------------------------------------------------------------------
TEXT_CHUNK_CHARS = 1500


def read_examples(source, *, chunk_chars: int = TEXT_CHUNK_CHARS) -> list[Example]:
    """Examples from ``.txt`` files (paragraphs, separated by blank lines, packed in order into examples
    of at most ``chunk_chars`` characters; a longer paragraph is cut at line ends), ``.jsonl`` files
    (one JSON object per line with ``text``, or ``prompt`` and ``response``), a folder of such files
    (sorted by name), or a list of examples (str, dict or (prompt, response))."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    out: list[Example] = []
    for item in source:
        if isinstance(item, Example):
            out.append(item)
            continue
        if not _names_a_file(item):
            out.append(_as_example(item, len(out)))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
            if not files:
                raise CacheError(f"{path}: no .txt or .jsonl files in this folder")
            out += read_examples(files, chunk_chars=chunk_chars)
            continue
        if not path.is_file():
            raise CacheError(f"{path}: no such dataset file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CacheError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    out.append(_as_example(json.loads(line), len(out)))
                except (ValueError, TypeError) as e:
                    raise CacheError(f"{path}:{n}: {e}") from None
        elif path.suffix == ".txt":
            paragraphs = []
            for p in text.replace("\r\n", "\n").split("\n\n"):
                p = p.strip("\n")
                while len(p) > chunk_chars and "\n" in p[1:chunk_chars]:  # a long paragraph: cut at lines
                    cut = p.rfind("\n", 1, chunk_chars)
                    paragraphs.append(p[:cut])
                    p = p[cut + 1:]
                if p.strip():
                    paragraphs.append(p)
            chunk: list[str] = []
            for p in paragraphs:
                if chunk and sum(len(c) + 2 for c in chunk) + len(p) > chunk_chars:
                    out.append(Example("", "\n\n".join(chunk), True))
                    chunk = []
                chunk.append(p)
            if chunk:
                out.append(Example("", "\n\n".join(chunk), True))
        else:
            raise CacheError(f"{path}: unknown dataset format (expected .txt or .jsonl)")
    if not out:
        raise CacheError("the dataset holds no examples")
    return out


def _names_a_file(item) -> bool:
    if isinstance(item, os.PathLike):
        return True
    if not isinstance(item, str) or "\n" in item or len(item) > 4096:
        return False
    return item.endswith((".txt", ".jsonl")) or Path(item).exists()


def dataset_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for part in (ex.prompt, ex.response, "1" if ex.whole_text else "0"):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def _truncate(vocab, ex: Example, ids: list[int], mask: list[int], max_length: int | None):
    """Keeps at most ``max_length`` teacher tokens, cut after the last kept token that ends on a
    character boundary; returns (ids, mask, text bytes, truncated)."""
    from ctalign import align as _align

    tb = ex.text.encode("utf-8")
    if max_length is None or len(ids) <= max_length:
        return ids, mask, tb, False
    _, end, _ = (x[0] for x in _align.token_spans(vocab, [ids], None, [ex.text]))
    for n in range(max_length, 0, -1):
        pos = int(end[n - 1])
        if pos == len(tb) or (tb[pos] & 0xC0) != 0x80:
            return ids[:n], mask[:n], tb[:pos], True
    raise CacheError("cannot truncate an example to max_length on a character boundary")


# ---- the run --------------------------------------------------------------------------------------
def _rank_and_world(rank, world_size) -> tuple[int, int]:
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise CacheError(f"rank {rank} is not within a world of {world_size}")
    return rank, world_size


def index_name(rank: int, world_size: int) -> str:
    return "index.json" if world_size == 1 else f"index-rank{rank}-of-{world_size}.json"


def cache_teacher(teacher, dataset, output_dir, *, teacher_vocab=None, top_k: int = 64, temperature: float = 1.0,
                  max_length: int | None = 512, batch_size: int = 8, shard_examples: int = 256,
                  logprob_codec: str = "q8", add_bos: bool = True, add_eos: bool = True, name: str | None = None,
                  device=None, rank: int | None = None, world_size: int | None = None,
                  progress: bool = True) -> Path:
    """Runs ``teacher`` over ``dataset`` and writes its top-k rows to ``output_dir``; returns the index.

    ``teacher``: a callable ``(input_ids, attention_mask) -> logits`` (with ``teacher_vocab=``), a
    transformers model folder or a GGUF file. ``dataset``: see :func:`read_examples`. Each example is
    encoded ``[bos] + prompt + response + [eos]`` with the teacher's tokenizer and cut to
    ``max_length`` tokens; at every position the cache keeps the ``top_k`` ids and log-probabilities
    of ``log_softmax(logits / temperature)``, the kept mass, and the log-probability of the teacher's
    own next token (for ALM). Started again on a folder it wrote with the same arguments, it resumes.
    """
    import torch

    from ctalign import ops

    if temperature <= 0 or not np.isfinite(temperature):
        raise CacheError(f"temperature must be positive, got {temperature}")
    if batch_size < 1 or shard_examples < 1:
        raise CacheError("batch_size and shard_examples must be at least 1")
    rank, world = _rank_and_world(rank, world_size)
    t = resolve_teacher(teacher, teacher_vocab, name, device)
    vocab = t.vocab
    codec = RowCodec(int(top_k), len(vocab), logprob_codec)
    examples = read_examples(dataset)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(examples) + shard_examples - 1) // shard_examples
    config = {
        "format": FORMAT, "version": VERSION,
        "teacher": {"name": t.name, "fingerprint": vocab.fingerprint, "vocab_size": len(vocab), "kind": vocab.kind,
                    "tokenizer": str(vocab.source) if getattr(vocab, "source", None) else None},
        "codec": codec.describe(), "temperature": float(temperature), "max_length": max_length,
        "add_bos": add_bos, "add_eos": add_eos, "shard_examples": shard_examples,
        "dataset": {"examples": len(examples), "sha256": dataset_fingerprint(examples)},
        "world_size": world,
    }
    index_path = out / index_name(rank, world)
    done: dict[int, dict] = {}
    if index_path.exists():
        try:
            old = json.loads(index_path.read_text())
        except ValueError as e:
            raise CacheError(f"{index_path}: corrupt index ({e}); remove it to start over") from None
        if old.get("config") != config:
            raise CacheError(f"{out}: holds a cache made with other arguments, teacher or data "
                             f"(see {index_path}); use another output folder")
        done = {int(s["index"]): s for s in old.get("shards", [])}
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if i not in done]
    dtype_name = None
    start = time.time()
    tokens_done = 0
    for n, i in enumerate(todo):
        lo, hi = i * shard_examples, min((i + 1) * shard_examples, len(examples))
        arrays, tokens, dtype_name = _run_shard(t, codec, examples[lo:hi], temperature, max_length, batch_size,
                                                add_bos, add_eos, torch, ops)
        digest, size = write_shard(out / f"shard-{i:05d}.ctc", arrays, {"index": i, "first_example": lo})
        done[i] = {"index": i, "file": f"shard-{i:05d}.ctc", "first_example": lo, "examples": hi - lo,
                   "tokens": tokens, "sha256": digest, "bytes": size}
        _write_index(index_path, config, done, dtype_name)
        tokens_done += tokens
        if progress:
            rate = tokens_done / max(time.time() - start, 1e-9)
            print(f"cache-teacher: shard {n + 1}/{len(todo)} (#{i}) {hi - lo} examples, {tokens} tokens, "
                  f"{rate:,.0f} teacher tokens/s", file=sys.stderr, flush=True)
    if not todo:
        _write_index(index_path, config, done, dtype_name)
    if world > 1:
        try:
            return merge_index(out)
        except CacheError:
            return index_path  # the other ranks have not finished: merge_index(out) once they have
    return index_path


def _write_index(path: Path, config: dict, done: dict[int, dict], dtype_name) -> None:
    old_dtype = None
    if path.exists():
        try:
            old_dtype = json.loads(path.read_text()).get("teacher_dtype")
        except ValueError:
            pass
    body = {"config": config, "teacher_dtype": dtype_name or old_dtype,
            "shards": [done[i] for i in sorted(done)]}
    _write_atomic(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())


def _run_shard(t, codec: RowCodec, examples: Sequence[Example], temperature, max_length, batch_size, add_bos,
               add_eos, torch, ops):
    vocab, V, k = t.vocab, codec.vocab_size, codec.k
    encoded = []
    for ex in examples:
        ids, mask = encode_example(vocab, ex, add_bos, add_eos)
        ids, mask, tb, cut = _truncate(vocab, ex, ids, mask, max_length)
        if len(ids) < 1:
            raise CacheError("an example encodes to no teacher token")
        encoded.append((ids, mask, tb, cut, min(len(ex.prompt.encode("utf-8")), len(tb)), ex.whole_text))
    rows_ids, rows_lp, own = [], [], []
    dtype_name = None
    for b0 in range(0, len(encoded), batch_size):
        batch = encoded[b0:b0 + batch_size]
        L = max(len(e[0]) for e in batch)
        pad = int(vocab.special_ids.get("pad", vocab.special_ids.get("eos", 0)))
        input_ids = torch.full((len(batch), L), pad, dtype=torch.long)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        for r, e in enumerate(batch):
            input_ids[r, : len(e[0])] = torch.tensor(e[0])
            att[r, : len(e[0])] = 1
        logits = t.forward(input_ids, att)
        logits = getattr(logits, "logits", logits)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (len(batch), L):
            raise CacheError(f"the teacher returned {type(logits).__name__} of shape "
                             f"{tuple(getattr(logits, 'shape', ()))}, expected logits [{len(batch)}, {L}, >= {V}]")
        if logits.shape[2] < V:
            raise CacheError(f"the teacher's logits are {logits.shape[2]} wide, narrower than its vocabulary ({V})")
        dtype_name = str(logits.dtype).replace("torch.", "")
        for r, e in enumerate(batch):
            n = len(e[0])
            x = logits[r, :n].detach().float().cpu()
            top = ops.topk_logprobs(x, k, vocab_size=V, temperature=temperature)
            lse = torch.logsumexp(x[:, :V] / temperature, -1)
            nxt = torch.tensor(e[0][1:] + [0])
            o = x[torch.arange(n), nxt] / temperature - lse
            o[-1] = float("-inf")  # the last row predicts past the text
            rows_ids.append(top.indices.numpy())
            rows_lp.append(top.logprobs.detach().double().numpy())
            own.append(o.numpy().astype(np.float32))
    ids_all = np.concatenate(rows_ids) if rows_ids else np.zeros((0, k), np.int64)
    lp_all = np.concatenate(rows_lp) if rows_lp else np.zeros((0, k))
    arrays = {"row_" + name: a for name, a in codec.encode(ids_all, lp_all).items()}
    lengths = np.array([len(e[0]) for e in encoded], dtype=np.int64)
    texts = [e[2] for e in encoded]
    arrays.update({
        "token_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "teacher_ids": np.concatenate([np.asarray(e[0], dtype=np.int32) for e in encoded]),
        "loss_mask": np.concatenate([np.asarray(e[1], dtype=np.uint8) for e in encoded]),
        "own_logprob": np.concatenate(own).astype(np.float32),
        "text_offsets": np.concatenate([[0], np.cumsum([len(b) for b in texts])]).astype(np.int64),
        "text": np.frombuffer(b"".join(texts), dtype=np.uint8),
        "response_start": np.array([e[4] for e in encoded], dtype=np.int64),
        "whole_text": np.array([e[5] for e in encoded], dtype=np.uint8),
        "truncated": np.array([e[3] for e in encoded], dtype=np.uint8),
    })
    return arrays, int(lengths.sum()), dtype_name


# ---- several ranks --------------------------------------------------------------------------------
def merge_index(output_dir) -> Path:
    """Merges the per-rank indexes of a cache written by several ranks into ``index.json``."""
    out = Path(output_dir)
    parts = sorted(out.glob("index-rank*-of-*.json"))
    if not parts:
        raise CacheError(f"{out}: no per-rank index to merge")
    bodies = []
    for p in parts:
        try:
            bodies.append(json.loads(p.read_text()))
        except ValueError as e:
            raise CacheError(f"{p}: corrupt index ({e})") from None
    world = bodies[0]["config"]["world_size"]
    if len(bodies) != world:
        raise CacheError(f"{out}: {len(bodies)} of {world} rank indexes are present")
    configs = [b["config"] for b in bodies]
    if any(c != configs[0] for c in configs):
        raise CacheError(f"{out}: the rank indexes were written with different arguments")
    shards = sorted((s for b in bodies for s in b["shards"]), key=lambda s: s["index"])
    cfg = configs[0]
    n_shards = (cfg["dataset"]["examples"] + cfg["shard_examples"] - 1) // cfg["shard_examples"]
    if [s["index"] for s in shards] != list(range(n_shards)):
        raise CacheError(f"{out}: shards missing from the rank indexes (have {len(shards)} of {n_shards})")
    merged = {"config": {**cfg, "world_size": 1}, "teacher_dtype": bodies[0].get("teacher_dtype"),
              "shards": shards, "merged_from": world}
    path = out / "index.json"
    _write_atomic(path, (json.dumps(merged, indent=1, sort_keys=True) + "\n").encode())
    return path

