"""A shard file of the teacher cache: named arrays behind a small JSON header, memory-mapped on read.

Layout: ``b"CTCACHE1"``, the header length (u64 little-endian), the header JSON
(``{"arrays": {name: [dtype, shape, offset]}, ...}``), then each array at a 64-byte aligned offset.
The file's sha256 is recorded in the cache index, not in the file, so a reader checks a shard in one
streaming pass (or not at all) and then maps only the arrays it reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from ctalign.artifact import _write_atomic
from ctalign.errors import CtalignError

MAGIC = b"CTCACHE1"
_ALIGN = 64
_DTYPES = ("|u1", "<u2", "<i4", "<i8", "<f2", "<f4")


class CacheError(CtalignError):
    """A teacher cache (index or shard) that cannot be used as it is; the message names the file."""


def encode_shard(arrays: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    entries, blobs, pos = {}, [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        code = a.dtype.str if a.dtype.itemsize > 1 else "|u1"
        if code not in _DTYPES:
            raise TypeError(f"shard array {name!r}: dtype {a.dtype} is not stored ({', '.join(_DTYPES)})")
        pos += (-pos) % _ALIGN
        entries[name] = [code, list(a.shape), pos]
        blobs.append((pos, a.view(np.uint8).reshape(-1).tobytes() if a.size else b""))
        pos += a.nbytes
    header = json.dumps({"arrays": entries, "meta": meta or {}}, sort_keys=True, separators=(",", ":")).encode()
    start = len(MAGIC) + 8 + len(header)
    start += (-start) % _ALIGN
    out = bytearray(MAGIC + struct.pack("<Q", len(header)) + header)
    out += b"\0" * (start - len(out))
    for off, blob in blobs:
        out += b"\0" * (start + off - len(out))
        out += blob
    return bytes(out)


def write_shard(path: Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> tuple[str, int]:
    """Writes atomically; returns (sha256 hex, size in bytes)."""
    data = encode_shard(arrays, meta)
    _write_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest(), len(data)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Shard:
    """The arrays of one shard file, memory-mapped (read-only) on first use."""

    def __init__(self, path: Path, *, size: int | None = None):
        self.path = Path(path)
        try:
            actual = os.path.getsize(self.path)
        except OSError as e:
            raise CacheError(f"{self.path}: cannot read shard ({e.strerror or e})") from None
        if size is not None and actual != size:
            raise CacheError(f"{self.path}: shard is {actual} bytes, the index says {size} (truncated or replaced)")
        with open(self.path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                raise CacheError(f"{self.path}: not a ctalign teacher-cache shard (magic {head[:8]!r})")
            (n,) = struct.unpack("<Q", head[len(MAGIC):])
            if n > actual:
                raise CacheError(f"{self.path}: truncated shard (header of {n} bytes in a {actual}-byte file)")
            try:
                header = json.loads(f.read(n))
                entries = header["arrays"]
                self.meta = header.get("meta", {})
            except (ValueError, KeyError, TypeError) as e:
                raise CacheError(f"{self.path}: corrupt shard header ({e})") from None
        start = len(MAGIC) + 8 + n
        start += (-start) % _ALIGN
        self._layout = {}
        for name, entry in entries.items():
            try:
                code, shape, off = entry
                dtype = np.dtype(code)
                if code not in _DTYPES or any(int(d) < 0 for d in shape) or int(off) < 0:
                    raise ValueError(entry)
                end = start + int(off) + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            except (ValueError, TypeError) as e:
                raise CacheError(f"{self.path}: corrupt entry for array {name!r} ({e})") from None
            if end > actual:
                raise CacheError(f"{self.path}: truncated shard (array {name!r} ends at byte {end}, file has {actual})")
            self._layout[name] = (dtype, tuple(int(d) for d in shape), start + int(off))
        self._maps: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._layout

    def __getitem__(self, name: str) -> np.ndarray:
        a = self._maps.get(name)
        if a is None:
            try:
                dtype, shape, off = self._layout[name]
            except KeyError:
                raise CacheError(f"{self.path}: shard has no array {name!r}") from None
            if int(np.prod(shape, dtype=np.int64)) == 0:
                a = np.zeros(shape, dtype=dtype)
            else:
                a = np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=shape)
            self._maps[name] = a
        return a

    def __getstate__(self):  # DataLoader workers (spawn) re-map the file in their own process
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
