"""Byte-prefix groups of an alignment map: for every teacher token, the longest student token whose
bytes are a prefix of its bytes (BPM's grouping), and the student-trie range of what is left of it
(ESCD's completion sets). Computed once per map object from the student's compiled byte trie and
cached on the map (``prefix_groups(amap)``).

Definitions (``docs/design.md`` notation; ``rep(b)`` is the smallest student id whose bytes are
``b``, the first member of the end range of the student-trie node ``b``):

==================  =============  ==================================================================
array               shape          meaning
==================  =============  ==================================================================
``group``           int32[V_t]     teacher token with bytes: ``rep(longest student prefix)``, or
                                   ``V_s`` (the residual column) when no student token is a prefix
                                   of its bytes; teacher special: ``first_student`` (the student
                                   special of its role, else ``V_s``)
``prefix_len``      int32[V_t]     byte length of that prefix (0 for the residual and specials)
``strict``          bool[V_t]      the prefix is shorter than the token: a residual ``r(t)`` is left
``child_lo/hi``     int32[V_t]     range in the student trie ``order`` of the student tokens whose
                                   bytes start with ``r(t)`` (``C(r)``); ``[0, 0)`` where not strict
                                   or where no student token starts with ``r(t)``
``student_group``   int32[V_s]     student id -> BPM column: ``rep(bytes(s))`` when some teacher
                                   token's group is that id (so ids sharing bytes share a column),
                                   a student special that receives a teacher special: itself; every
                                   other student token: ``V_s`` (the student's residual mass)
``rep``             int32[V_s]     ``rep(bytes(s))`` (``s`` itself for specials)
==================  =============  ==================================================================

These are arrays of the map (issue #16): ``build_map`` computes them (``compute_prefix_groups``)
and the artifact stores them as ``prefix_groups.<array>`` (``strict`` as uint8; format version 2).
``prefix_groups(amap)`` reads the stored arrays; it computes them only for a map object that lacks
them. A loaded map's arrays are checked against its token tables by :func:`check_prefix_groups`.

The walk is vectorised over all teacher tokens at once (numpy over the trie's child arrays: one
``searchsorted`` per byte depth), O(sum of teacher token lengths x log(student nodes)); about 0.2 s
for a 150k x 128k pair, at build time.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["PrefixGroups", "PG_FIELDS", "prefix_groups", "compute_prefix_groups", "check_prefix_groups",
           "student_byte_trie"]

# The arrays of PrefixGroups, stored in the artifact as ``prefix_groups.<name>``.
PG_FIELDS = ("group", "prefix_len", "strict", "child_lo", "child_hi", "student_group", "rep")


class PrefixGroups(NamedTuple):
    group: np.ndarray
    prefix_len: np.ndarray
    strict: np.ndarray
    child_lo: np.ndarray
    child_hi: np.ndarray
    student_group: np.ndarray
    rep: np.ndarray
    n_teacher: int
    n_student: int

    @property
    def residual_column(self) -> int:
        return self.n_student

    def summary(self) -> dict:
        """Counts: teacher tokens per kind of group, student tokens that are some teacher token's group."""
        Vs = self.n_student
        return {"teacher_tokens": self.n_teacher,
                "to_residual": int((self.group == Vs).sum()),
                "strict": int(self.strict.sum()),
                "strict_without_completion": int((self.strict & (self.child_hi <= self.child_lo)).sum()),
                "student_columns": int(len(np.unique(self.group[self.group < Vs]))),
                "student_to_residual": int((self.student_group == Vs).sum())}


def student_byte_trie(amap):
    """The student's byte ``SequenceTrie`` of a map (the student vocabulary's, or rebuilt from the
    map's student token table; cached on the map)."""
    store = amap.__dict__.setdefault("_ctalign_prefix_groups", {})
    trie = store.get("student_trie")
    if trie is None:
        student = getattr(amap, "student", None)
        if student is not None and hasattr(student, "trie"):
            trie = student.trie
        else:
            from ctalign import _core
            trie = _core.SequenceTrie.from_token_table(amap.student_table)
        store["student_trie"] = trie
    return trie


def _arr(trie, name: str) -> np.ndarray:
    v = getattr(trie, name)
    return np.asarray(v() if callable(v) else v)


def _walk(trie, offsets: np.ndarray, data: np.ndarray, start: np.ndarray, stop: np.ndarray):
    """Walks every byte string ``data[start[i]:stop[i]]`` down the trie from the root, all at once.
    Returns (node where the whole string ends or -1, deepest visited node that some member ends at
    or -1, that node's depth in bytes)."""
    child_start, child_node = _arr(trie, "child_start").astype(np.int64), _arr(trie, "child_node").astype(np.int64)
    node_symbol = _arr(trie, "node_symbol").astype(np.int64)
    node_lo, node_end = _arr(trie, "node_lo"), _arr(trie, "node_end")
    parent = np.repeat(np.arange(len(child_start) - 1, dtype=np.int64), np.diff(child_start))
    keys = parent * 256 + node_symbol[child_node]  # sorted: parents in order, symbols increasing
    n = len(start)
    node = np.zeros(n, dtype=np.int64)
    pos = start.astype(np.int64).copy()
    alive = pos < stop
    fell = np.zeros(n, dtype=bool)
    best = np.full(n, -1, dtype=np.int64)
    best_depth = np.zeros(n, dtype=np.int64)
    depth = 0
    while alive.any():
        i = np.nonzero(alive)[0]
        key = node[i] * 256 + data[pos[i]].astype(np.int64)
        j = np.searchsorted(keys, key)
        ok = j < len(keys)
        ok[ok] = keys[j[ok]] == key[ok]
        fell[i[~ok]] = True
        alive[i[~ok]] = False
        i, j = i[ok], j[ok]
        node[i] = child_node[j]
        depth += 1
        ends = node_end[node[i]] > node_lo[node[i]]
        best[i[ends]] = node[i[ends]]
        best_depth[i[ends]] = depth
        pos[i] += 1
        alive[i] = pos[i] < stop[i]
    full = np.where(fell, -1, node)
    return full, best, best_depth


def _compute(amap) -> PrefixGroups:
    return compute_prefix_groups(amap.teacher_table, student_byte_trie(amap), amap.first_student,
                                 int(amap.n_teacher), int(amap.n_student))


def compute_prefix_groups(teacher_table, student_trie, first_student, n_teacher: int, n_student: int) -> PrefixGroups:
    """The :class:`PrefixGroups` of a teacher token table over a student byte trie (``first_student``:
    the map's array, the group of teacher specials)."""
    trie = student_trie
    order, node_lo, node_hi = _arr(trie, "order"), _arr(trie, "node_lo"), _arr(trie, "node_hi")
    Vt, Vs = int(n_teacher), int(n_student)
    tt = teacher_table
    off = np.asarray(tt.offsets).astype(np.int64)
    data = np.asarray(tt.data)
    has = np.asarray(tt.has_bytes).astype(bool)
    first_student = np.asarray(first_student).astype(np.int64)
    _, best, best_depth = _walk(trie, off, data, off[:-1], off[1:])
    group = np.where(best >= 0, order[node_lo[np.maximum(best, 0)]], Vs).astype(np.int64)
    group = np.where(has, group, first_student)
    prefix_len = np.where(has & (best >= 0), best_depth, 0)
    length = off[1:] - off[:-1]
    strict = has & (best >= 0) & (prefix_len < length)
    # residual r(t) = bytes(t)[prefix_len:]: its node in the student trie (C(r) is that node's range)
    child_lo = np.zeros(Vt, dtype=np.int64)
    child_hi = np.zeros(Vt, dtype=np.int64)
    idx = np.nonzero(strict)[0]
    if idx.size:
        full, _, _ = _walk(trie, off, data, off[idx] + prefix_len[idx], off[idx + 1])
        found = full >= 0
        child_lo[idx[found]] = node_lo[full[found]]
        child_hi[idx[found]] = node_hi[full[found]]
    # student side: representative ids, and which of them are BPM columns
    member_node = _arr(trie, "member_node").astype(np.int64)
    s_has = member_node >= 0
    rep = np.arange(Vs, dtype=np.int64)
    rep[s_has] = order[node_lo[member_node[s_has]]]
    used = np.zeros(Vs + 1, dtype=bool)
    used[group] = True
    used[Vs] = False
    student_group = np.where(used[rep], rep, Vs)
    i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    return PrefixGroups(i32(group), i32(prefix_len), strict, i32(child_lo), i32(child_hi), i32(student_group),
                        i32(rep), Vt, Vs)


def prefix_groups(amap) -> PrefixGroups:
    """The :class:`PrefixGroups` of an alignment map (computed on first use, cached on the map)."""
    if not (hasattr(amap, "first_student") and hasattr(amap, "teacher_table")):
        raise TypeError(f"expected an AlignmentMap (ctalign.build_map), got {type(amap).__name__}")
    store = amap.__dict__.setdefault("_ctalign_prefix_groups", {})
    pg = store.get("groups")
    if pg is None:
        stored = getattr(amap, "_arrays", {})
        if f"prefix_groups.{PG_FIELDS[0]}" in stored:  # the map's own arrays (every built or loaded map)
            pg = from_arrays(stored, int(amap.n_teacher), int(amap.n_student))
        else:  # a map object made without them
            pg = _compute(amap)
        store["groups"] = pg
    return pg


def to_arrays(pg: PrefixGroups) -> dict[str, np.ndarray]:
    """The artifact arrays (``prefix_groups.<name>``; ``strict`` as uint8)."""
    out = {}
    for f in PG_FIELDS:
        a = getattr(pg, f)
        out[f"prefix_groups.{f}"] = np.ascontiguousarray(a, dtype=np.uint8 if f == "strict" else np.int32)
    return out


def from_arrays(arrays: dict[str, np.ndarray], n_teacher: int, n_student: int) -> PrefixGroups:
    """:class:`PrefixGroups` over a map's stored arrays (no copy but ``strict`` as bool)."""
    a = {f: arrays[f"prefix_groups.{f}"] for f in PG_FIELDS}
    a["strict"] = a["strict"].astype(bool)
    return PrefixGroups(**a, n_teacher=n_teacher, n_student=n_student)


def check_prefix_groups(arrays: dict[str, np.ndarray], teacher_table, student_trie, fail) -> None:
    """Exact check of a loaded map's ``prefix_groups.*`` arrays, cheaper than rebuilding them:
    ``arrays`` are the map's arrays, whose token tables, teacher trie, cover ranges and first_student
    were checked already; ``student_trie`` is rebuilt from the student table. ``fail(problem)`` raises.

    - ``rep`` and ``student_group`` are recomputed (O(V_s) over the student trie);
    - ``group`` / ``prefix_len``: a student group ``g`` is a representative with ``|bytes(g)| =
      prefix_len >= 1`` whose cover range holds the teacher token (so ``bytes(g)`` is a prefix of
      it), and no student token is a longer prefix: over each student token's cover range the
      minimum ``prefix_len`` is at least its length (one ``minimum.reduceat``, O(sum of cover
      lengths)); the residual column has ``prefix_len`` 0, teacher specials take ``first_student``;
    - ``strict`` is recomputed from those; ``child_lo/hi`` are rebuilt (the trie walk of the
      residuals only, about a tenth of the build's walk)."""
    Vt = len(arrays["first_student"])
    Vs = len(arrays["cover_lo"])
    pg = {f: arrays[f"prefix_groups.{f}"] for f in PG_FIELDS}
    name = lambda f: f"prefix_groups.{f}"  # noqa: E731
    want = {"group": (np.int32, Vt), "prefix_len": (np.int32, Vt), "strict": (np.uint8, Vt),
            "child_lo": (np.int32, Vt), "child_hi": (np.int32, Vt), "student_group": (np.int32, Vs),
            "rep": (np.int32, Vs)}
    for f, (dtype, n) in want.items():
        if pg[f].dtype != dtype or pg[f].shape != (n,):
            fail(f"{name(f)} is {pg[f].dtype}{list(pg[f].shape)}, expected {np.dtype(dtype)}[{n}]")
    trie = student_trie
    order, node_lo, node_hi = _arr(trie, "order"), _arr(trie, "node_lo"), _arr(trie, "node_hi")
    member_node = _arr(trie, "member_node").astype(np.int64)
    s_has = member_node >= 0
    rep = np.arange(Vs, dtype=np.int64)
    rep[s_has] = order[node_lo[member_node[s_has]]]
    if not np.array_equal(rep, pg["rep"]):
        fail(f"{name('rep')} differs from the one rebuilt from student_table")
    group = pg["group"].astype(np.int64)
    if group.size and (group.min() < 0 or group.max() > Vs):
        fail(f"{name('group')} holds ids out of range")
    used = np.zeros(Vs + 1, dtype=bool)
    used[group] = True
    used[Vs] = False
    if not np.array_equal(np.where(used[rep], rep, Vs), pg["student_group"]):
        fail(f"{name('student_group')} differs from the one rebuilt from {name('group')} and student_table")
    t_off = np.asarray(arrays["teacher_table.offsets"]).astype(np.int64)
    has = np.asarray(arrays["teacher_table.has_bytes"]).astype(bool)
    s_off = np.asarray(arrays["student_table.offsets"]).astype(np.int64)
    s_len = np.diff(s_off)
    s_has_bytes = np.asarray(arrays["student_table.has_bytes"]).astype(bool)
    t_len = np.diff(t_off)
    plen = pg["prefix_len"].astype(np.int64)
    fs = np.asarray(arrays["first_student"]).astype(np.int64)
    if np.any(~has & ((group != fs) | (plen != 0))):
        fail(f"{name('group')} / {name('prefix_len')} of teacher specials are not first_student / 0")
    to_res = has & (group == Vs)
    if np.any(to_res & (plen != 0)):
        fail(f"{name('prefix_len')} is not 0 where {name('group')} is the residual column")
    grouped = np.nonzero(has & (group < Vs))[0]
    g = group[grouped]
    rank = np.asarray(arrays["teacher_trie.rank"]).astype(np.int64)
    cover_lo = np.asarray(arrays["cover_lo"]).astype(np.int64)
    cover_hi = np.asarray(arrays["cover_hi"]).astype(np.int64)
    r = rank[grouped]
    if not (np.all(s_has_bytes[g]) and np.array_equal(rep[g], g) and np.array_equal(plen[grouped], s_len[g])
            and np.all(plen[grouped] >= 1) and np.all((cover_lo[g] <= r) & (r < cover_hi[g]))):
        fail(f"{name('group')} / {name('prefix_len')}: a group is not a student token whose bytes are a prefix "
             f"of the teacher token of that length")
    # longest: over every student token's cover range, prefix_len >= its length
    t_order = np.asarray(arrays["teacher_trie.order"]).astype(np.int64)
    ranged = np.nonzero(s_has_bytes & (cover_hi > cover_lo) & (s_len > 0))[0]
    if ranged.size:
        ranged = ranged[np.argsort(cover_lo[ranged], kind="stable")]
        plen_ord = np.append(plen[t_order], 0)  # a sentinel: reduceat indices stay < len
        idx = np.empty(2 * len(ranged), dtype=np.int64)
        idx[0::2], idx[1::2] = cover_lo[ranged], cover_hi[ranged]
        low = np.minimum.reduceat(plen_ord, idx)[0::2]
        if np.any(low < s_len[ranged]):
            fail(f"{name('group')} / {name('prefix_len')}: some teacher token has a longer student prefix than "
                 f"its group")
    strict = has & (group < Vs) & (plen < t_len)
    if not np.array_equal(strict.astype(np.uint8), pg["strict"]):
        fail(f"{name('strict')} differs from the one rebuilt from {name('prefix_len')} and teacher_table")
    child_lo = np.zeros(Vt, dtype=np.int64)
    child_hi = np.zeros(Vt, dtype=np.int64)
    i = np.nonzero(strict)[0]
    if i.size:
        data = np.asarray(arrays["teacher_table.data"])
        full, _, _ = _walk(trie, t_off, data, t_off[i] + plen[i], t_off[i + 1])
        found = full >= 0
        child_lo[i[found]] = node_lo[full[found]]
        child_hi[i[found]] = node_hi[full[found]]
    for f, rebuilt in (("child_lo", child_lo), ("child_hi", child_hi)):
        if not np.array_equal(rebuilt, pg[f]):
            fail(f"{name(f)} differs from the one rebuilt from {name('prefix_len')} and the token tables")
