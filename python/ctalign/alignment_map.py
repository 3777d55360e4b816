"""The teacher -> student alignment map: ``build_map`` and the saved artifact (``AlignmentMap``).

    >>> amap = build_map("asset:llama3", "asset:qwen")       # doctest: +SKIP
    >>> amap.regime, amap.report()["identical_share"]         # doctest: +SKIP
    >>> amap.save("pair.ctmap"); AlignmentMap.load("pair.ctmap", teacher, student)  # doctest: +SKIP

Tables (numpy, read-only; docs/ARCHITECTURE.md "Alignment map"; V_t, V_s = vocabulary sizes):

=====================  ============================  =========================================
``identical``          int32[K, 2]                   (teacher id, student id) with equal bytes
``cover_lo/cover_hi``  int32[V_s]                    range in ``teacher_order`` of the teacher
                                                     tokens whose bytes start with bytes(s)
``dec_offsets``        int64[V_t+1], ``dec_ids``     dec_S(t) CSR (empty for teacher specials)
``first_student``      int32[V_t]                    dec_S(t)[0]; specials: the student special of
                                                     the same role (bos, eos, pad, unk), for other
                                                     specials the one with the same text, else V_s
                                                     (the end column)
``dec_trie``           SequenceTrie, alphabet V_s    teacher ids sorted by dec_S
``teacher_trie``       SequenceTrie, alphabet 256    the teacher byte trie (``teacher_order``,
                                                     ``first_byte`` and the node arrays)
``prefix_groups.*``    int32[V_t] / int32[V_s]       BPM / ESCD byte-prefix groups: ``group``,
                                                     ``prefix_len``, ``strict`` (uint8),
                                                     ``child_lo/hi`` (V_t); ``student_group``,
                                                     ``rep`` (V_s) (:mod:`ctalign.prefix_groups`)
=====================  ============================  =========================================

Python only orchestrates: the student's tokenizer computes dec_S (``Vocab.encode_raw`` over every
teacher token's bytes), the compiled core (``_core.build_alignment_map``, GIL released) does the
rest in O(V_t + V_s + sum |dec_S|); the prefix groups are a numpy walk of the teacher tokens down
the student byte trie (about 0.2 s for Qwen -> Llama-3). A saved map holds the teacher byte trie, both token tables
and every table above, so ``AlignmentMap.load(path)`` works without the tokenizer files.

File format (``.ctmap``, version 2: version 1 had no ``prefix_groups.*`` arrays and is refused with
a message to rebuild it with ``ctalign build-map``), all little-endian::

    magic b"CTALMAP1" | version u32 | reserved u32 | header length u64 | directory length u64
    header JSON (sizes, regime, fingerprints, names, kinds, special roles, report)
    array directory JSON [[name, dtype, shape, offset, nbytes], ...]
    arrays, each at a multiple of 64 bytes from the start
    sha256 of everything before it (32 bytes)

Writes are atomic (temporary file in the target folder, fsync, ``os.replace``) and deterministic
(the same inputs give the same bytes: no timings, paths or dates in the file). Loading checks
magic, version, sizes, checksum and table shapes, then treats the map as untrusted: the token
tables must have the header's fingerprints, and every derived array (teacher trie, identical
pairs, cover, first_student, dec trie) and statistic is rebuilt from the token tables and dec_S and
must equal the stored one; the prefix groups pass an exact consistency check that is cheaper than
rebuilding them (:func:`ctalign.prefix_groups.check_prefix_groups`) (:class:`ArtifactError` names
the path and the array). Given the tokenizers, their fingerprints and special roles must match
(:class:`MapMismatchError`).
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctalign.artifact import FORMAT_VERSION, MAGIC, _encode_artifact, _read_artifact, _write_atomic
from ctalign.errors import ArtifactError, CtalignError, MapMismatchError
from ctalign.prefix_groups import PG_FIELDS

__all__ = ["AlignmentMap", "build_map", "resolve_spec", "ArtifactError", "MapMismatchError",
           "MAGIC", "FORMAT_VERSION"]

REGIMES = ("identical", "subset", "general")
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
ROLES = SPECIAL_ROLES + ("other",)
TRIE_FIELDS = ("order", "rank", "member_node", "first_symbol", "node_lo", "node_hi", "node_end",
               "node_depth", "node_parent", "node_symbol", "child_start", "child_node")
MAP_FIELDS = ("identical", "cover_lo", "cover_hi", "dec_offsets", "dec_ids", "first_student")
TABLE_FIELDS = ("offsets", "data", "has_bytes")
# Asset aliases for vocabularies made of several files.
_ASSET_PAIRS = {"gpt2": ("gpt2-encoder", "gpt2-merges")}


# ---- vocabularies --------------------------------------------------------------------------------
def resolve_spec(spec: Any) -> Any:
    """``asset:NAME`` -> the cached path of that asset (``asset:gpt2`` -> the encoder/merges pair);
    anything else is returned unchanged for ``load_vocab``."""
    if isinstance(spec, str) and spec.startswith("asset:"):
        from ctalign import assets
        name = spec[len("asset:"):]
        if name in _ASSET_PAIRS:
            return tuple(str(assets.path(n)) for n in _ASSET_PAIRS[name])
        if name not in assets.ASSETS or assets.ASSETS[name].family == "text":
            known = sorted([n for n, a in assets.ASSETS.items() if a.family != "text"] + list(_ASSET_PAIRS))
            raise CtalignError(f"{spec}: unknown tokenizer asset (known: {', '.join(known)})")
        return str(assets.path(name))
    return spec


def _load(spec: Any, pattern: str | None = None):
    from ctalign.vocab import Vocab, load_vocab
    if isinstance(spec, Vocab):
        return spec
    kw = {"pattern": pattern} if pattern is not None else {}
    if isinstance(spec, str) and spec.startswith("asset:"):
        kw["name"] = spec[len("asset:"):]
    v = load_vocab(resolve_spec(spec), **kw)
    if pattern is not None and v.kind != "tiktoken":
        raise CtalignError(f"{spec}: a split pattern applies to tiktoken rank files only; this is a {v.kind} "
                           f"tokenizer, which carries its own pre-tokenizer")
    return v


def _side_info(v) -> dict:
    """What the artifact records about one vocabulary (no paths: artifacts stay deterministic)."""
    details = getattr(v, "details", {}) or {}
    n_with_bytes = int(np.count_nonzero(v.byte_table()[2]))
    return {
        "name": v.name,
        "kind": v.kind,
        "size": len(v),
        "with_bytes": n_with_bytes,
        "fingerprint": v.fingerprint,
        "specials": [[int(i), role, v.special_text.get(i, "")] for i, role in sorted(v.specials.items())],
        "prefix_space": bool(v.prefix_space),
        "normalizer": v.normalizer,
        "lossy_normalizer": v.lossy_normalizer,
        "format": details.get("format"),
        "byte_fallback": details.get("byte_fallback"),
    }


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return offsets, ids


def _dec_tables(teacher, student) -> tuple[np.ndarray, np.ndarray]:
    """dec_S CSR over every teacher id: the student's encode_raw of all teacher token bytes at once,
    from the raw bytes: the student's Unicode canonical form (NFC) is not applied, or teacher tokens
    that differ only by it (Qwen: `;` and U+037E, `K` and U+212A) would share one dec_S and each
    count the other's mass."""
    pieces = teacher.all_token_bytes()
    with_bytes = [i for i, p in enumerate(pieces) if p is not None]
    encoded = student.encode_raw([pieces[i] for i in with_bytes], normalize=False)
    if len(with_bytes) == len(pieces):
        return _csr(encoded)
    lists: list[list[int]] = [[] for _ in range(len(pieces))]
    for i, ids in zip(with_bytes, encoded):
        lists[i] = ids
    return _csr(lists)


def _special_target(teacher, student) -> np.ndarray:
    """int32[V_t]: -1, or for a teacher special the student special of the same role (bos, eos,
    pad, unk); a special without such a role goes to the student special with the same text, else
    to V_s (the end column)."""
    return _special_target_of(
        len(teacher), [(i, role, teacher.special_text.get(i, "")) for i, role in teacher.specials.items()],
        len(student), [(i, role, student.special_text.get(i, "")) for i, role in student.specials.items()])


def _special_target_of(n_teacher: int, teacher_specials, n_student: int, student_specials) -> np.ndarray:
    """:func:`_special_target` from (id, role, text) lists (a vocabulary's, or an artifact header's)."""
    target = np.full(n_teacher, -1, dtype=np.int32)
    by_text: dict[str, int] = {}
    first_of_role: dict[str, int] = {}
    for i, role, text in sorted(student_specials):
        by_text.setdefault(text, i)
        first_of_role.setdefault(role, i)
    for i, role, text in teacher_specials:
        s = first_of_role.get(role) if role in SPECIAL_ROLES else None
        if s is None and role not in SPECIAL_ROLES:
            s = by_text.get(text)
        target[i] = n_student if s is None else s
    return target


def _never_emitted(teacher) -> np.ndarray | None:
    """uint8[V_t]: 1 for teacher tokens whose text the teacher's own normalizer rewrites (the
    teacher never emits them on normalized text); None when the teacher does not normalize."""
    if not teacher.normalizer:
        return None
    import unicodedata
    norm = teacher.normalizer.lower()
    if norm in ("nfc", "nfkc", "nfd", "nfkd"):
        form = norm.upper()

        def changes(text: str) -> bool:
            return not unicodedata.is_normalized(form, text)
    else:
        def changes(text: str) -> bool:
            return teacher.normalize(text) != text
    out = np.zeros(len(teacher), dtype=np.uint8)
    for i, b in enumerate(teacher.all_token_bytes()):
        if b is None:
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if changes(text):
            out[i] = 1
    return out


# ---- building ------------------------------------------------------------------------------------
def prepare_for_mapping(vocab, side: str) -> None:
    """Finish loading what the loaders build lazily and a map build needs: the teacher's encoder and
    merge list, the student's raw encoder (its compiled BPE included). This is tokenizer loading, so
    ``build_map`` (and the benchmarks) count it as parse time, not build time."""
    if side == "teacher":
        vocab.encode_raw([b"a"])
        vocab.merges
    elif side == "student":
        vocab.prepare_encode_raw()
    else:
        raise ValueError(f"side must be 'teacher' or 'student', not {side!r}")


def build_map(teacher, student, *, teacher_pattern: str | None = None, student_pattern: str | None = None,
              progress: Callable[[str], None] | None = None) -> "AlignmentMap":
    """Build the teacher -> student map. ``teacher`` / ``student``: a :class:`~ctalign.vocab.Vocab`
    or a ``load_vocab`` spec (a path, or ``asset:NAME``); ``*_pattern``: the split regex of a
    tiktoken rank file that is no known encoding. ``progress`` receives one line per step."""
    say = progress or (lambda _msg: None)
    timings: dict[str, float] = {}
    vocabs = []
    for side, spec, pattern in (("teacher", teacher, teacher_pattern), ("student", student, student_pattern)):
        from ctalign.vocab import Vocab
        t0 = time.perf_counter()
        if not isinstance(spec, Vocab):
            say(f"loading {side} {spec}")
        v = _load(spec, pattern)
        prepare_for_mapping(v, side)
        timings[f"parse_{side}_s"] = time.perf_counter() - t0
        vocabs.append(v)
    teacher, student = vocabs
    timings["parse_s"] = timings["parse_teacher_s"] + timings["parse_student_s"]

    from ctalign import _core
    t0 = time.perf_counter()
    same = teacher.fingerprint == student.fingerprint

    say(f"compiling tables ({len(teacher):,} teacher and {len(student):,} student tokens)")
    teacher_table, teacher_trie, student_table = teacher.table, teacher.trie, student.table
    merges = None
    if not same:
        try:
            merges = teacher.merge_table
        except ValueError:  # merges the core rejects: no subset check ("not checked" in the report)
            merges = None
    t1 = time.perf_counter()
    say(f"encoding {len(teacher):,} teacher tokens with the student tokenizer")
    dec_offsets, dec_ids = _dec_tables(teacher, student)
    t2 = time.perf_counter()
    say("building the map")
    exempt = _never_emitted(teacher) if merges is not None else None
    core = _core.build_alignment_map(teacher_table, teacher_trie, student_table, dec_offsets, dec_ids,
                                     _special_target(teacher, student), merges, exempt)
    t3 = time.perf_counter()
    say("computing the byte-prefix groups")
    from ctalign.prefix_groups import compute_prefix_groups, to_arrays
    pg = compute_prefix_groups(teacher_table, student.trie, core["first_student"], len(teacher), len(student))
    t4 = time.perf_counter()
    timings.update(tables_s=t1 - t0, encode_raw_s=t2 - t1, core_s=t3 - t2, prefix_groups_s=t4 - t3, build_s=t4 - t0)

    arrays = {name: core[name] for name in MAP_FIELDS}
    arrays.update(to_arrays(pg))
    for name, trie in (("teacher_trie", teacher_trie), ("dec_trie", core["dec_trie"])):
        for f in TRIE_FIELDS:
            arrays[f"{name}.{f}"] = getattr(trie, f)
    for name, table in (("teacher_table", teacher_table), ("student_table", student_table)):
        for f in TABLE_FIELDS:
            arrays[f"{name}.{f}"] = getattr(table, f)
    for a in arrays.values():
        if a.flags.writeable:
            a.flags.writeable = False
    header = {
        "format": "ctalign alignment map",
        "regime": core["regime"],
        "teacher": _side_info(teacher),
        "student": _side_info(student),
        "stats": dict(core["stats"]),
    }
    if merges is not None:
        reachable = np.asarray(merges.reachable, dtype=bool)
        header["stats"]["teacher_unreachable"] = int(np.count_nonzero(~reachable & teacher.byte_table()[2].astype(bool)))
    amap = AlignmentMap(header, arrays, teacher=teacher, student=student, timings=timings)
    amap._tries = {"teacher_trie": teacher_trie, "dec_trie": core["dec_trie"]}
    amap._tables = {"teacher_table": teacher_table, "student_table": student_table}
    amap._ctalign_prefix_groups = {"student_trie": student.trie}
    return amap


# ---- the map -------------------------------------------------------------------------------------
class AlignmentMap:
    """A teacher -> student alignment map (see the module docstring). Build with :func:`build_map`,
    or read with :meth:`load`. ``teacher`` / ``student`` are the vocabularies, or None for a map
    loaded without them."""

    def __init__(self, header: dict, arrays: dict[str, np.ndarray], *, teacher=None, student=None,
                 timings: dict[str, float] | None = None, path: str | None = None):
        self._header = header
        self._arrays = arrays
        self.teacher = teacher
        self.student = student
        self._timings = dict(timings or {})
        self.path = path
        self._tries: dict[str, Any] = {}
        self._tables: dict[str, Any] = {}

    # -- identity ----------------------------------------------------------------------------------
    @property
    def regime(self) -> str:
        return self._header["regime"]

    @property
    def n_teacher(self) -> int:
        return int(self._header["teacher"]["size"])

    @property
    def n_student(self) -> int:
        return int(self._header["student"]["size"])

    @property
    def teacher_fingerprint(self) -> str:
        return self._header["teacher"]["fingerprint"]

    @property
    def student_fingerprint(self) -> str:
        return self._header["student"]["fingerprint"]

    @property
    def teacher_specials(self) -> dict[int, str]:
        """Teacher special id -> role (bos, eos, pad, unk, other)."""
        return {int(i): role for i, role, _ in self._header["teacher"]["specials"]}

    @property
    def student_specials(self) -> dict[int, str]:
        return {int(i): role for i, role, _ in self._header["student"]["specials"]}

    @property
    def teacher_special_ids(self) -> dict[str, int]:
        """Role -> first teacher id of that role."""
        out: dict[str, int] = {}
        for i, role in self.teacher_specials.items():
            out.setdefault(role, i)
        return out

    @property
    def student_special_ids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, role in self.student_specials.items():
            out.setdefault(role, i)
        return out

    @property
    def header(self) -> dict:
        """The artifact header (a copy): sizes, regime, both sides' descriptions, counts."""
        return json.loads(json.dumps(self._header))

    # -- tables ------------------------------------------------------------------------------------
    @property
    def identical(self) -> np.ndarray:
        return self._arrays["identical"]

    @property
    def cover_lo(self) -> np.ndarray:
        return self._arrays["cover_lo"]

    @property
    def cover_hi(self) -> np.ndarray:
        return self._arrays["cover_hi"]

    @property
    def dec_offsets(self) -> np.ndarray:
        return self._arrays["dec_offsets"]

    @property
    def dec_ids(self) -> np.ndarray:
        return self._arrays["dec_ids"]

    @property
    def first_student(self) -> np.ndarray:
        return self._arrays["first_student"]

    @property
    def teacher_order(self) -> np.ndarray:
        """int32[M]: teacher ids with bytes sorted by bytes (the order cover ranges index)."""
        return self._arrays["teacher_trie.order"]

    @property
    def first_byte(self) -> np.ndarray:
        """int32[V_t]: first byte of each teacher token, 256 for specials."""
        return self._arrays["teacher_trie.first_symbol"]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every stored table by artifact name (``teacher_trie.node_lo``, ``dec_trie.order``, ...)."""
        return dict(self._arrays)

    def trie_arrays(self, which: str = "teacher_trie") -> dict[str, np.ndarray]:
        """The node arrays of ``teacher_trie`` or ``dec_trie`` without building a SequenceTrie."""
        if which not in ("teacher_trie", "dec_trie"):
            raise ValueError(f"trie_arrays: which must be 'teacher_trie' or 'dec_trie', got {which!r}")
        return {f: self._arrays[f"{which}.{f}"] for f in TRIE_FIELDS}

    def dec(self, t: int) -> list[int]:
        """dec_S(t) as a list of student ids."""
        if not 0 <= t < self.n_teacher:
            raise IndexError(f"teacher id {t} out of range [0, {self.n_teacher})")
        return self.dec_ids[self.dec_offsets[t]:self.dec_offsets[t + 1]].tolist()

    @property
    def teacher_table(self):
        """The teacher's ``_core.TokenTable`` (the vocabulary's, or rebuilt from the artifact)."""
        return self._table("teacher_table")

    @property
    def student_table(self):
        return self._table("student_table")

    def _table(self, name: str):
        if name not in self._tables:
            vocab = self.teacher if name == "teacher_table" else self.student
            if vocab is not None:
                self._tables[name] = vocab.table
            else:
                from ctalign import _core
                self._tables[name] = _core.TokenTable(*(self._arrays[f"{name}.{f}"] for f in TABLE_FIELDS))
        return self._tables[name]

    @property
    def teacher_trie(self):
        """The teacher byte trie (``_core.SequenceTrie``, alphabet 256)."""
        return self._trie("teacher_trie")

    @property
    def dec_trie(self):
        """The teacher ids sorted by dec_S (``_core.SequenceTrie``, alphabet V_s)."""
        return self._trie("dec_trie")

    def _trie(self, name: str):
        if name in self._tries:
            return self._tries[name]
        from ctalign import _core
        if name == "teacher_trie":
            trie = self.teacher.trie if self.teacher is not None else \
                _core.SequenceTrie.from_token_table(self.teacher_table)
        else:
            member = self._arrays["teacher_table.has_bytes"]
            trie = _core.SequenceTrie(self.dec_offsets, self.dec_ids, member, max(self.n_student, 1))
        # The stored arrays and the rebuilt trie must agree: ops read either.
        for f in TRIE_FIELDS:
            if not np.array_equal(getattr(trie, f), self._arrays[f"{name}.{f}"]):
                raise ArtifactError(self.path or "<map>", f"stored {name}.{f} differs from the trie rebuilt "
                                                          f"from the stored tables")
        self._tries[name] = trie
        return trie

    # -- report ------------------------------------------------------------------------------------
    def report(self) -> dict:
        """A JSON-ready summary: sizes, families, regime, identical share, uncovered student
        tokens, dec_S statistics, subset check counts, warnings and timings."""
        h = self._header
        s = h["stats"]
        t_info, s_info = h["teacher"], h["student"]

        def side(info: dict) -> dict:
            roles = {}
            for i, role, _ in info["specials"]:
                roles.setdefault(role, int(i))
            return {"name": info["name"], "kind": info["kind"], "format": info.get("format"), "size": info["size"],
                    "with_bytes": info["with_bytes"], "specials": len(info["specials"]),
                    "special_roles": {r: i for r, i in roles.items() if r != "other"},
                    "prefix_space": info["prefix_space"], "normalizer": info["normalizer"],
                    "lossy_normalizer": info["lossy_normalizer"], "fingerprint": info["fingerprint"]}

        t_bytes = max(s["teacher_with_bytes"], 1)
        s_bytes = max(s["student_with_bytes"], 1)
        rep: dict[str, Any] = {
            "teacher": side(t_info),
            "student": side(s_info),
            "regime": h["regime"],
            "identical_pairs": s["identical_pairs"],
            "identical_share": {"teacher": round(s["teacher_with_identical"] / t_bytes, 6),
                                "student": round(s["student_with_identical"] / s_bytes, 6)},
            "uncovered_student_tokens": s["uncovered_student"],
            "dec": {"total": s["dec_total"], "mean_length": round(s["dec_total"] / t_bytes, 4),
                    "max_length": s["dec_max_length"], "single_token_share": round(s["dec_single"] / t_bytes, 6),
                    "empty": s["dec_empty"], "bytes_mismatch": s["dec_bytes_mismatch"]},
            "specials": self._special_report(),
            "warnings": self._warnings(),
        }
        if h["regime"] != "identical":
            rep["subset_check"] = {
                "student_tokens_not_in_teacher": s["student_with_bytes"] - s["student_with_identical"],
                "teacher_tokens_unroll_mismatch": None if s["unroll_mismatch"] < 0 else s["unroll_mismatch"],
                "first_unroll_mismatch": None if s["first_unroll_mismatch"] < 0 else s["first_unroll_mismatch"],
                "teacher_tokens_exempt": s.get("subset_exempt", 0),
            }
        if "teacher_unreachable" in s:
            rep["teacher_unreachable_tokens"] = s["teacher_unreachable"]
        rep["timings"] = {k: round(v, 4) for k, v in self._timings.items()}
        if self.path is not None:
            rep["path"] = str(self.path)
        return rep

    def _special_report(self) -> dict:
        fs = self.first_student
        mapped = {}
        for i, role in sorted(self.teacher_specials.items()):
            if role in SPECIAL_ROLES and role not in mapped:
                target = int(fs[i])
                mapped[role] = {"teacher": i, "student": None if target == self.n_student else target}
        specials = list(self.teacher_specials)
        to_end = int(np.count_nonzero(fs[specials] == self.n_student)) if specials else 0
        return {"roles": mapped, "to_end_column": to_end}

    def _warnings(self) -> list[str]:
        h = self._header
        s = h["stats"]
        t, st = h["teacher"], h["student"]
        out = []
        for side, info in (("teacher", t), ("student", st)):
            if info["lossy_normalizer"]:
                out.append(f"{side} {info['name']!r} normalizes text lossily ({info['lossy_normalizer']}): "
                           f"its tokens do not spell the original bytes")
        if t["prefix_space"] != st["prefix_space"]:
            adds, not_adds = (t, st) if t["prefix_space"] else (st, t)
            out.append(f"prefix space differs: {adds['name']!r} adds a space before the first word, "
                       f"{not_adds['name']!r} does not; the first token of a text aligns differently")
        if s["dec_empty"]:
            out.append(f"{s['dec_empty']:,} teacher tokens have an empty dec_S (the student drops their bytes, "
                       f"e.g. whitespace); their first_student is the end column")
        lossy = s["dec_bytes_mismatch"] - s["dec_empty"]
        if lossy > 0:
            norm = f", normalizer {st['normalizer']}" if st.get("normalizer") else ""
            out.append(f"{lossy:,} teacher tokens have a dec_S that does not spell their bytes (student unk, "
                       f"dropped characters{norm})")
        if s.get("teacher_unreachable"):
            out.append(f"{s['teacher_unreachable']:,} teacher tokens are unreachable by BPE merges over their own "
                       f"bytes (emitted only as whole pre-tokens, if at all)")
        roles = self._special_report()["roles"]
        missing = [r for r, m in roles.items() if m["student"] is None]
        if missing:
            out.append(f"teacher special roles without a student counterpart ({', '.join(missing)}) map to "
                       f"the end column")
        uncovered = s["uncovered_student"]
        if uncovered and uncovered > 0.2 * max(s["student_with_bytes"], 1):
            out.append(f"{uncovered:,} student tokens ({uncovered / max(s['student_with_bytes'], 1):.0%}) prefix "
                       f"no teacher token: their cover mass is 0")
        return out

    def __repr__(self) -> str:
        return (f"AlignmentMap({self._header['teacher']['name']!r} -> {self._header['student']['name']!r}, "
                f"regime={self.regime!r}, V_t={self.n_teacher}, V_s={self.n_student})")

    # -- persistence -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The artifact's bytes (what :meth:`save` writes)."""
        return _encode_artifact(self._header, self._arrays)

    def save(self, path) -> Path:
        """Write the artifact atomically (temporary file + fsync + rename). Returns the path."""
        path = Path(path)
        t0 = time.perf_counter()
        _write_atomic(path, self.to_bytes())
        self._timings["save_s"] = time.perf_counter() - t0
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path, teacher=None, student=None) -> "AlignmentMap":
        """Read and verify an artifact. With ``teacher`` / ``student`` (Vocab or spec), their
        fingerprints must match the ones the map was built for (:class:`MapMismatchError`)."""
        t0 = time.perf_counter()
        header, arrays = _read_artifact(path)
        _check_tables(header, arrays, str(path))
        amap = cls(header, arrays, path=str(path))
        try:  # the report reads most of the header: a header written by another tool must hold it all
            amap.report()
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(str(path), f"inconsistent header: the report cannot be made ({type(e).__name__}: {e})") from None
        _check_derived(amap, str(path))
        amap._timings["load_s"] = time.perf_counter() - t0
        if teacher is not None or student is not None:
            amap.verify(teacher, student)
        return amap

    def verify(self, teacher=None, student=None) -> None:
        """Check that ``teacher`` / ``student`` (Vocab or spec; None skips a side) are the
        vocabularies this map was built for, and attach them. Raises MapMismatchError."""
        given = {}
        for side, v in (("teacher", teacher), ("student", student)):
            if v is None:
                continue
            v = _load(v)
            info = self._header[side]
            if v.fingerprint != info["fingerprint"]:
                where = f" ({self.path})" if self.path else ""
                raise MapMismatchError(
                    f"alignment map{where} was built for {side} {info['name']!r} ({info['kind']}, "
                    f"{info['size']:,} tokens, fingerprint {info['fingerprint'][:12]}), but the given {side} "
                    f"{v.name!r} ({v.kind}, {len(v):,} tokens) has fingerprint {v.fingerprint[:12]}")
            specials = {int(i): role for i, role, _ in info["specials"]}
            if v.specials != specials:
                raise MapMismatchError(f"alignment map{f' ({self.path})' if self.path else ''} records other special "
                                       f"token roles for {side} {info['name']!r} than the given {v.name!r} has")
            given[side] = v
        for side, v in given.items():
            setattr(self, side, v)
            self._tables.pop(f"{side}_table", None)
            if side == "teacher":
                self._tries.pop("teacher_trie", None)
# ---- checks of a loaded map ---------------------------------------------------------------------
# Stats that the map's core computes from the tables and dec_S alone (the subset check needs the
# teacher's merges, which the artifact does not hold).
_REBUILT_STATS = ("identical_pairs", "teacher_with_bytes", "student_with_bytes", "teacher_with_identical",
                  "student_with_identical", "uncovered_student", "dec_empty", "dec_bytes_mismatch", "dec_single",
                  "dec_max_length", "dec_total")
_DERIVED = ("identical", "cover_lo", "cover_hi", "first_student")


def _check_derived(amap: "AlignmentMap", path: str) -> None:
    """A map is untrusted input: its checksum proves the file is whole, not that its tables belong
    to its tokenizers. Every derived array is rebuilt from the two token tables and dec_S (the
    teacher byte trie, then the map's core: identical pairs, cover, first_student, dec trie; the
    core's O(V_t + V_s + sum |dec_S|) is cheaper than checking each invariant) and must equal the
    stored one; the token tables must have the header's fingerprints and the header's statistics and
    regime must be the rebuilt ones. ArtifactError names the first array that differs."""
    from ctalign import _core
    arrays, header = amap._arrays, amap._header

    def fail(problem: str):
        raise ArtifactError(path, f"forged or inconsistent map: {problem}")

    tables = {}
    for name, side in (("teacher_table", "teacher"), ("student_table", "student")):
        try:
            table = _core.TokenTable(*(arrays[f"{name}.{f}"] for f in TABLE_FIELDS))
        except ValueError as e:
            fail(f"{name} is no token table ({e})")
        if str(table.fingerprint) != header[side]["fingerprint"]:
            fail(f"{name} does not have the {side} fingerprint the header records")
        n_bytes = int(np.count_nonzero(arrays[f"{name}.has_bytes"]))
        if header[side]["with_bytes"] != n_bytes:
            fail(f"the header's {side} with_bytes ({header[side]['with_bytes']}) is not {name}'s {n_bytes}")
        tables[name] = table
    teacher_trie = _core.SequenceTrie.from_token_table(tables["teacher_table"])
    for f in TRIE_FIELDS:
        if not np.array_equal(getattr(teacher_trie, f), arrays[f"teacher_trie.{f}"]):
            fail(f"teacher_trie.{f} differs from the trie rebuilt from teacher_table")
    sides = {}
    for side, name in (("teacher", "teacher_table"), ("student", "student_table")):
        specials = [(int(i), str(role), str(text)) for i, role, text in header[side]["specials"]]
        has = arrays[f"{name}.has_bytes"]
        if any(not 0 <= i < len(has) or has[i] or role not in ROLES for i, role, _ in specials) \
                or len({i for i, _, _ in specials}) != len(specials):
            fail(f"the header's {side} specials are not distinct ids without bytes with known roles")
        sides[side] = specials
    target = _special_target_of(amap.n_teacher, sides["teacher"], amap.n_student, sides["student"])
    try:
        core = _core.build_alignment_map(tables["teacher_table"], teacher_trie, tables["student_table"],
                                         arrays["dec_offsets"], arrays["dec_ids"], target, None, None)
    except ValueError as e:
        fail(f"dec_S does not fit the token tables ({e})")
    for name in _DERIVED:
        if not np.array_equal(core[name], arrays[name]):
            fail(f"{name} differs from the one rebuilt from the token tables and dec_S")
    dec_trie = core["dec_trie"]
    for f in TRIE_FIELDS:
        if not np.array_equal(getattr(dec_trie, f), arrays[f"dec_trie.{f}"]):
            fail(f"dec_trie.{f} differs from the trie rebuilt from dec_S")
    stats = header["stats"]
    for key in ("unroll_mismatch", "first_unroll_mismatch", "subset_exempt", "teacher_unreachable"):
        val = stats.get(key, 0)  # from the subset check (the teacher's merges): in range at least
        if not isinstance(val, int) or isinstance(val, bool) or not -1 <= val <= amap.n_teacher:
            fail(f"the header's stats.{key} ({val!r}) is no count of teacher tokens")
    for key in _REBUILT_STATS:
        if stats.get(key) != core["stats"][key]:
            fail(f"the header's stats.{key} ({stats.get(key)}) is not the rebuilt {core['stats'][key]}")
    regime = header["regime"]
    if (regime == "identical") != (core["regime"] == "identical"):
        fail(f"regime {regime!r}, but the token tables are {'' if core['regime'] == 'identical' else 'not '}identical")
    if regime == "subset" and (stats["student_with_identical"] != stats["student_with_bytes"]
                               or stats.get("unroll_mismatch") != 0):
        fail("regime 'subset', but not every student token is a teacher token or the unroll check failed")
    from ctalign.prefix_groups import check_prefix_groups
    student_trie = _core.SequenceTrie.from_token_table(tables["student_table"])
    check_prefix_groups(arrays, tables["teacher_table"], student_trie, fail)
    amap._tables = tables
    amap._tries = {"teacher_trie": teacher_trie, "dec_trie": dec_trie}
    amap.__dict__.setdefault("_ctalign_prefix_groups", {})["student_trie"] = student_trie


def _check_tables(header: dict, arrays: dict[str, np.ndarray], path: str) -> None:
    """Shapes, dtypes and id ranges of a loaded map: a file whose checksum holds but whose tables
    do not fit together (written by another tool) is refused before any op reads it."""
    def fail(problem: str):
        raise ArtifactError(path, f"inconsistent tables: {problem}")

    try:
        regime = header["regime"]
        Vt, Vs = int(header["teacher"]["size"]), int(header["student"]["size"])
        for side in ("teacher", "student"):
            info = header[side]
            for key in ("name", "kind", "fingerprint", "specials", "prefix_space", "lossy_normalizer", "with_bytes"):
                info[key]
        header["stats"]["dec_total"]
    except (KeyError, TypeError, ValueError) as e:
        fail(f"header lacks {e}")
    if regime not in REGIMES:
        fail(f"unknown regime {regime!r}")
    want = {"identical": (np.int32, None), "cover_lo": (np.int32, (Vs,)), "cover_hi": (np.int32, (Vs,)),
            "dec_offsets": (np.int64, (Vt + 1,)), "dec_ids": (np.int32, None), "first_student": (np.int32, (Vt,)),
            "teacher_table.offsets": (np.int64, (Vt + 1,)), "teacher_table.data": (np.uint8, None),
            "teacher_table.has_bytes": (np.uint8, (Vt,)), "student_table.offsets": (np.int64, (Vs + 1,)),
            "student_table.data": (np.uint8, None), "student_table.has_bytes": (np.uint8, (Vs,))}
    for trie in ("teacher_trie", "dec_trie"):
        for f in TRIE_FIELDS:
            want[f"{trie}.{f}"] = (np.int32, None)
    for f in PG_FIELDS:
        want[f"prefix_groups.{f}"] = (np.uint8 if f == "strict" else np.int32,
                                      (Vs,) if f in ("student_group", "rep") else (Vt,))
    for name, (dtype, shape) in want.items():
        a = arrays.get(name)
        if a is None:
            fail(f"no array {name!r}")
        if a.dtype != dtype or (shape is not None and a.shape != shape):
            fail(f"{name} is {a.dtype}{list(a.shape)}, expected {np.dtype(dtype)}{list(shape) if shape else ''}")
    ident = arrays["identical"]
    if ident.ndim != 2 or ident.shape[1] != 2:
        fail(f"identical has shape {list(ident.shape)}, expected [K, 2]")
    if ident.size and (ident[:, 0].min() < 0 or ident[:, 0].max() >= Vt or ident[:, 1].min() < 0
                       or ident[:, 1].max() >= Vs):
        fail("identical holds ids out of range")
    off, ids = arrays["dec_offsets"], arrays["dec_ids"]
    if off[0] != 0 or off[-1] != len(ids) or np.any(np.diff(off) < 0):
        fail("dec_offsets are not a CSR over dec_ids")
    if ids.size and (ids.min() < 0 or ids.max() >= Vs):
        fail("dec_ids hold student ids out of range")
    fs = arrays["first_student"]
    if fs.size and (fs.min() < 0 or fs.max() > Vs):
        fail("first_student holds ids out of range")
    order = arrays["teacher_trie.order"]
    lo, hi = arrays["cover_lo"], arrays["cover_hi"]
    if lo.size and (lo.min() < 0 or np.any(hi < lo) or hi.max() > len(order)):
        fail("cover_lo / cover_hi ranges lie outside the teacher order")
    if order.size and (order.min() < 0 or order.max() >= Vt):
        fail("teacher_trie.order holds ids out of range")
    for side, V in (("teacher_table", Vt), ("student_table", Vs)):
        o = arrays[f"{side}.offsets"]
        if o[0] != 0 or o[-1] != len(arrays[f"{side}.data"]) or np.any(np.diff(o) < 0):
            fail(f"{side}.offsets are not a CSR over {side}.data")
    for trie in ("teacher_trie", "dec_trie"):  # both tries index teacher ids; the kernels trust them
        _check_trie_arrays({f: arrays[f"{trie}.{f}"] for f in TRIE_FIELDS}, Vt,
                           lambda problem, trie=trie: fail(f"{trie}: {problem}"))


def _check_trie_arrays(a: dict[str, np.ndarray], n_ids: int, fail) -> None:
    """Every index a kernel follows stays in range: node ranges inside the order, children CSR
    over valid non-root nodes, ranks and member nodes in range."""
    n_nodes, n_members = len(a["node_lo"]), len(a["order"])
    if any(len(a[f]) != n_nodes for f in ("node_hi", "node_end", "node_depth", "node_parent", "node_symbol")):
        fail("node arrays differ in length")
    if len(a["child_start"]) != n_nodes + 1 or len(a["rank"]) != n_ids or len(a["member_node"]) != n_ids \
            or len(a["first_symbol"]) != n_ids:
        fail("child_start / rank / member_node / first_symbol have the wrong length")
    cs, cn = a["child_start"], a["child_node"]
    if n_nodes == 0 or cs[0] != 0 or cs[-1] != len(cn) or np.any(np.diff(cs) < 0):
        fail("child_start is not a CSR over child_node")
    if cn.size and (cn.min() < 1 or cn.max() >= n_nodes):
        fail("child_node holds node ids out of range")
    lo, end, hi = a["node_lo"], a["node_end"], a["node_hi"]
    if np.any(lo < 0) or np.any(end < lo) or np.any(hi < end) or hi.max() > n_members:
        fail("node ranges lie outside the order")
    if n_members and (a["order"].min() < 0 or a["order"].max() >= n_ids):
        fail("order holds ids out of range")
    if a["rank"].min(initial=0) < -1 or a["rank"].max(initial=0) >= max(n_members, 1):
        fail("rank holds positions out of range")
    if a["member_node"].min(initial=0) < -1 or a["member_node"].max(initial=0) >= n_nodes:
        fail("member_node holds node ids out of range")
