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

The walk is vectorised over all teacher tokens at once (numpy over the trie's child arrays: one
``searchsorted`` per byte depth), O(sum of teacher token lengths x log(student nodes)); about 0.2 s
for a 150k x 128k pair, once per map object.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["PrefixGroups", "prefix_groups", "student_byte_trie"]


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
    trie = student_byte_trie(amap)
    order, node_lo, node_hi = _arr(trie, "order"), _arr(trie, "node_lo"), _arr(trie, "node_hi")
    Vt, Vs = int(amap.n_teacher), int(amap.n_student)
    tt = amap.teacher_table
    off = np.asarray(tt.offsets).astype(np.int64)
    data = np.asarray(tt.data)
    has = np.asarray(tt.has_bytes).astype(bool)
    first_student = np.asarray(amap.first_student).astype(np.int64)
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
        pg = store["groups"] = _compute(amap)
    return pg
