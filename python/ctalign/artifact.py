"""The ``.ctmap`` container: a JSON header and named int arrays behind a magic, a version and a sha256.

Layout (little-endian): preamble ``magic[8] version:u32 reserved:u32 header_len:u64 directory_len:u64``,
the header JSON, the array directory JSON (name, dtype, shape, offset, size), the arrays at 64-byte aligned
offsets, and the sha256 of everything before it. Files are written atomically (a temporary file in the
same folder, fsync, rename). What the arrays mean is :mod:`ctalign.alignment_map`'s business.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from ctalign.errors import ArtifactError

MAGIC = b"CTALMAP1"
# 2: the byte-prefix group arrays (``prefix_groups.*``, issue #16). Older versions are refused with a
# message to rebuild the map (there is no migration: the arrays need the token tables and the walk).
FORMAT_VERSION = 2


_ALIGN = 64
_PREAMBLE = struct.Struct("<8sIIQQ")  # magic, version, reserved, header length, directory length
_DIGEST = 32
_DTYPES = {"<i4": np.dtype("<i4"), "<i8": np.dtype("<i8"), "|u1": np.dtype("u1")}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _encode_artifact(header: dict, arrays: dict[str, np.ndarray], *, version: int = FORMAT_VERSION) -> bytes:
    """The artifact's bytes (``version``: only tests write another one)."""
    prepared = []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        code = "|u1" if a.dtype.itemsize == 1 else a.dtype.newbyteorder("<").str
        if code not in _DTYPES or a.dtype.kind not in "iub":
            raise TypeError(f"array {name!r}: dtype {a.dtype} cannot be stored (int32, int64, uint8 only)")
        prepared.append((name, np.ascontiguousarray(a, dtype=_DTYPES[code]), code))
    header_bytes = _json_bytes({"version": version, **header})
    # The directory holds offsets that depend on its own length: iterate to a fixed point.
    directory_bytes, entries = b"", []
    for _ in range(8):
        pos = _PREAMBLE.size + len(header_bytes) + len(directory_bytes)
        entries = []
        for name, a, code in prepared:
            pos += (-pos) % _ALIGN
            entries.append([name, code, list(a.shape), pos, a.nbytes])
            pos += a.nbytes
        new = _json_bytes(entries)
        if len(new) == len(directory_bytes):
            directory_bytes = new
            break
        directory_bytes = new
    out = bytearray(_PREAMBLE.pack(MAGIC, version, 0, len(header_bytes), len(directory_bytes)))
    out += header_bytes
    out += directory_bytes
    for (_, a, _), entry in zip(prepared, entries):
        out += b"\0" * (entry[3] - len(out))
        out += a.tobytes()
    out += hashlib.sha256(out).digest()
    return bytes(out)


def _write_atomic(path: Path, data: bytes) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise ArtifactError(path, f"cannot write: folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable too, where the platform allows it
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _read_artifact(path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ArtifactError(path, "no such file") from None
    except IsADirectoryError:
        raise ArtifactError(path, "is a directory, not an alignment map") from None
    except OSError as e:
        raise ArtifactError(path, f"cannot read ({e.strerror or e})") from None
    return _decode_artifact(data, path)


def _decode_artifact(data: bytes, path) -> tuple[dict, dict[str, np.ndarray]]:
    size = len(data)
    minimum = _PREAMBLE.size + _DIGEST
    if size == 0:
        raise ArtifactError(path, "empty file, not a ctalign alignment map")
    if data[:8] != MAGIC:
        if size < 8 and MAGIC.startswith(data):
            raise ArtifactError(path, f"truncated: {size} bytes, an alignment map has at least {minimum}")
        if data[:7] == MAGIC[:7]:
            raise ArtifactError(path, f"unsupported alignment map generation {data[:8]!r} (this ctalign reads {MAGIC!r})")
        raise ArtifactError(path, f"not a ctalign alignment map (magic {data[:8]!r}, expected {MAGIC!r})")
    if size < minimum:
        raise ArtifactError(path, f"truncated: {size} bytes, an alignment map has at least {minimum}")
    _, version, _, header_len, directory_len = _PREAMBLE.unpack_from(data, 0)
    if version < FORMAT_VERSION:
        raise ArtifactError(path, f"format version {version} is from an older ctalign (this ctalign reads version "
                                  f"{FORMAT_VERSION}, which adds the byte-prefix group arrays): rebuild the map with "
                                  f"`ctalign build-map TEACHER STUDENT -o PATH`")
    if version != FORMAT_VERSION:
        raise ArtifactError(path, f"unsupported format version {version} (this ctalign reads version {FORMAT_VERSION})")
    body_end = _PREAMBLE.size + header_len + directory_len
    if body_end > size - _DIGEST:
        raise ArtifactError(path, f"truncated: {size} bytes, the header alone needs {body_end + _DIGEST}")
    try:
        header = json.loads(data[_PREAMBLE.size:_PREAMBLE.size + header_len].decode())
        directory = json.loads(data[_PREAMBLE.size + header_len:body_end].decode())
        if not isinstance(header, dict) or not isinstance(directory, list):
            raise ValueError("unexpected JSON structure")
    except ValueError as e:
        raise ArtifactError(path, f"corrupt header ({e})") from None
    checked = []
    end = body_end
    try:
        for entry in directory:
            name, code, shape, offset, nbytes = entry
            dtype = _DTYPES[code]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"array {name!r} has shape {shape}")
            if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes or offset < end or offset % _ALIGN:
                raise ValueError(f"array {name!r} has an inconsistent entry")
            checked.append((str(name), dtype, tuple(shape), int(offset), int(nbytes)))
            end = offset + nbytes
    except (TypeError, ValueError, KeyError) as e:
        raise ArtifactError(path, f"corrupt array directory ({e})") from None
    if size < end + _DIGEST:
        raise ArtifactError(path, f"truncated: {size} bytes, expected {end + _DIGEST}")
    if size > end + _DIGEST:
        raise ArtifactError(path, f"{size - end - _DIGEST} unexpected bytes after the end "
                                  f"(expected {end + _DIGEST} bytes)")
    if hashlib.sha256(memoryview(data)[:size - _DIGEST]).digest() != data[size - _DIGEST:]:
        raise ArtifactError(path, "checksum mismatch: the file is corrupt (its sha256 differs from the recorded one)")
    arrays = {}
    for name, dtype, shape, offset, nbytes in checked:
        a = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
        arrays[name] = a.astype(dtype.newbyteorder("="), copy=False)
    return header, arrays
