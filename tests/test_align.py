"""Alignment of two tokenizations (ctalign.align, cpp/token_alignment.cpp) on real tokenizer pairs,
checked against a brute-force Python definition of every output."""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest

from conftest import get_test_vocab

from ctalign import align as A

PAIRS = [("llama3", "mistral-v1"), pytest.param("gpt2", "qwen", marks=pytest.mark.slow),
         ("mistral-v1", "bert-uncased"), pytest.param("qwen", "llama3", marks=pytest.mark.slow),
         ("botchan-unigram", "gpt2")]


@functools.lru_cache(maxsize=None)
def get_map(teacher: str, student: str):
    from ctalign.alignment_map import build_map
    return build_map(get_test_vocab(teacher), get_test_vocab(student))


def sample_texts(corpus_lines, botchan_text, n=6):
    lines = [l for l in corpus_lines if len(l) > 10]
    picks = [lines[i * len(lines) // n] for i in range(n)]
    return picks + [botchan_text[:600], "x", "  two leading spaces", "ends with spaces   ", "12345 678"]


def encode_with_specials(v, texts):
    """ids with the vocabulary's bos/eos around each text (when it has them)."""
    out = []
    for t in texts:
        ids = v.encode(t)
        if "bos" in v.special_ids:
            ids = [v.special_ids["bos"]] + ids
        if "eos" in v.special_ids:
            ids = ids + [v.special_ids["eos"]]
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------------------------
def brute_row(t_ids, t_span, t_role, s_ids, s_span, s_role, tv, amap, K):
    """Every alignment output of one row, by definition, in O(n^2) Python."""
    ts, te, tl = t_span
    ss, se, sl = s_span
    nt, ns = len(t_ids), len(s_ids)
    tcov = [k for k in range(nt) if te[k] > ts[k]]
    scov = [j for j in range(ns) if se[j] > ss[j]]

    def inside(cov, st, en, p):
        return any(st[k] < p < en[k] for k in cov)

    edges = sorted({ts[k] for k in tcov} | {te[k] for k in tcov} | {ss[j] for j in scov} | {se[j] for j in scov})
    common = [p for p in edges if not inside(tcov, ts, te, p) and not inside(scov, ss, se, p)]
    segs = []
    for a, b in zip(common, common[1:]):
        tt = [k for k in tcov if a <= ts[k] and te[k] <= b]
        sj = [j for j in scov if a <= ss[j] and se[j] <= b]
        if tt or sj:
            segs.append((a, b, tt, sj))
    # matched specials: same position, role and occurrence number at that position
    def specials(n, st, en, role):
        out, seen = {}, {}
        for k in range(n):
            if role[k] != 0 and st[k] == en[k]:
                key = (st[k], role[k])
                occ = seen.get(key, 0)
                seen[key] = occ + 1
                out[(st[k], role[k], occ)] = k
        return out
    tsp = specials(nt, ts, te, t_role)
    ssp = specials(ns, ss, se, s_role)
    matched = {}
    for key, j in ssp.items():
        if key in tsp and not inside(tcov, ts, te, key[0]) and not inside(scov, ss, se, key[0]):
            matched[j] = tsp[key]
    items = [((a, 1, a), ("seg", a, b, tt, sj)) for a, b, tt, sj in segs]
    items += [((ss[j], 0, j), ("sp", j, k)) for j, k in matched.items()]
    items.sort(key=lambda x: x[0])
    chunks, t_chunk, s_chunk = [], [-1] * nt, [-1] * ns
    for c, (_, it) in enumerate(items):
        if it[0] == "seg":
            _, a, b, tt, sj = it
            chunks.append((a, b, 0, len(tt), len(sj)))
            for k in tt:
                t_chunk[k] = c
            for j in sj:
                s_chunk[j] = c
        else:
            _, j, k = it
            chunks.append((ss[j], ss[j], 1, 1, 1))
            s_chunk[j] = c
            t_chunk[k] = c

    def chunk_at(p):
        for c, (a, b, sp, _, _) in enumerate(chunks):
            if not sp and a <= p < b:
                return c
        for c, (a, b, sp, _, _) in enumerate(chunks):
            if not sp and b == p:
                return c
        return -1
    for k in range(nt):
        if te[k] == ts[k] and t_role[k] == 0:
            t_chunk[k] = chunk_at(ts[k])
    for j in range(ns):
        if se[j] == ss[j] and s_role[j] == 0:
            s_chunk[j] = chunk_at(ss[j])

    def spot(p):
        for k in tcov:
            if te[k] > p:
                return k, (p - ts[k] + tl[k]) if ts[k] <= p else 0
        return -1, 0

    def prefix_node(k, depth):
        if depth == 0:
            return 0
        if t_role[k] != 0:
            return -1
        return int(tv.trie.lookup(tv.token_bytes(t_ids[k])[:depth]))

    dec = amap.dec_trie if amap is not None else None
    row, tok, pre, cons, after, atb, ends = ([-1] * ns for _ in range(7))
    for j in range(ns):
        if s_role[j] != 0 and ss[j] == se[j]:
            k = matched.get(j, -1)
            tok[j], row[j] = k, (k - 1 if k >= 0 else -1)
            pre[j] = 0 if k >= 0 else -1
            cons[j] = 0 if (k >= 0 and dec is not None) else -1
            atb[j] = ends[j] = int(k >= 0)
            continue
        k, depth = spot(ss[j])
        if k < 0:
            atb[j] = ends[j] = 0
            continue
        tok[j], row[j] = k, k - 1
        pre[j] = prefix_node(k, depth)
        atb[j] = int(depth == 0)
        ends[j] = int(se[j] == te[k])
        if dec is None:
            continue
        def starts_fresh(q, kq):
            """Token q starts k's pieces: at k's start, or no student token covers k's bytes before it."""
            if spot(ss[q]) == (kq, 0):
                return True
            prev = q - 1
            prev_special = prev >= 0 and s_role[prev] != 0 and ss[prev] == se[prev]
            prev_token = -1 if prev < 0 or prev_special else spot(ss[prev])[0]
            byte_prev = [x for x in range(q) if not (s_role[x] != 0 and ss[x] == se[x])]
            last_end = se[byte_prev[-1]] if byte_prev else -1
            return prev_token != kq and last_end <= ts[kq]

        if depth == 0 or starts_fresh(j, k):
            cons[j] = 0
        else:
            # the run of student tokens inside k, contiguous, ending exactly at ss[j], from one that
            # starts k's pieces
            run, p, q = [], ss[j], j - 1
            while q >= 0 and not (s_role[q] != 0 and ss[q] == se[q]) and se[q] == p:
                kq, dq = spot(ss[q])
                if kq != k:
                    break
                run.append(q)
                if starts_fresh(q, k):
                    break
                p = ss[q]
                q -= 1
            if run and starts_fresh(run[-1], k):
                run.reverse()
                seq = [s_ids[x] for x in run]
                cons[j] = int(dec.lookup(seq)) if all(s_role[x] == 0 for x in run) else -1
        if cons[j] >= 0 and se[j] <= te[k] and s_role[j] == 0 and t_role[k] == 0:
            node = cons[j]
            kids = [c for c in range(dec.child_start[node], dec.child_start[node + 1])]
            hits = [dec.child_node[c] for c in kids if dec.node_symbol[dec.child_node[c]] == s_ids[j]]
            after[j] = int(hits[0]) if hits else -1
    byte_row = np.full((ns, K), -1)
    byte_pre = np.full((ns, K), -1)
    for j in range(ns):
        if s_role[j] != 0 or se[j] == ss[j]:
            continue
        for i in range(sl[j], K):
            pos = ss[j] - sl[j] + i
            if pos >= se[j]:
                break
            k, depth = spot(pos)
            if k <= 0:
                continue
            node = prefix_node(k, depth)
            if node < 0:
                continue
            byte_row[j, i], byte_pre[j, i] = k - 1, node
    return dict(chunks=chunks, t_chunk=t_chunk, s_chunk=s_chunk, s_teacher_token=tok, s_teacher_row=row,
                s_prefix=pre, s_consumed=cons, s_consumed_after=after, s_at_boundary=atb, s_ends_teacher=ends,
                byte_row=byte_row, byte_prefix=byte_pre)


def check_against_brute(a, t_ids, s_ids, tv, sv, amap, K):
    for b in range(len(t_ids)):
        nt, ns = len(t_ids[b]), len(s_ids[b])
        t_span = tuple(x[b, :nt].tolist() for x in (a.t_start, a.t_end, a.t_lead))
        s_span = tuple(x[b, :ns].tolist() for x in (a.s_start, a.s_end, a.s_lead))
        ref = brute_row(t_ids[b], t_span, a.t_role[b, :nt].tolist(), s_ids[b], s_span, a.s_role[b, :ns].tolist(),
                        tv, amap, K)
        n = int(a.n_chunks[b])
        got_chunks = list(zip(a.chunk_start[b, :n].tolist(), a.chunk_end[b, :n].tolist(),
                              a.chunk_special[b, :n].tolist(), a.chunk_t_count[b, :n].tolist(),
                              a.chunk_s_count[b, :n].tolist()))
        assert got_chunks == ref["chunks"], f"row {b}"
        assert a.t_chunk[b, :nt].tolist() == ref["t_chunk"], f"row {b}"
        assert a.s_chunk[b, :ns].tolist() == ref["s_chunk"], f"row {b}"
        for name in ("s_teacher_token", "s_teacher_row", "s_prefix", "s_consumed", "s_consumed_after",
                     "s_at_boundary", "s_ends_teacher"):
            got = getattr(a, name)[b, :ns].long().tolist()
            assert got == ref[name], f"row {b} {name}: first difference at " \
                f"{next(i for i, (x, y) in enumerate(zip(got, ref[name])) if x != y)}"
        if K:
            np.testing.assert_array_equal(a.byte_row[b, :ns].numpy(), ref["byte_row"], err_msg=f"row {b}")
            np.testing.assert_array_equal(a.byte_prefix[b, :ns].numpy(), ref["byte_prefix"], err_msg=f"row {b}")
        # padding is -1 / False
        assert (a.s_chunk[b, ns:] == -1).all() and (a.s_teacher_row[b, ns:] == -1).all()
        assert (a.t_chunk[b, nt:] == -1).all()


# ---------------------------------------------------------------------------------------------
# spans
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama3", "gpt2", "qwen", "mistral-v1", "bert-uncased", "botchan-unigram",
                                  "tekken"])
def test_token_spans_cover_the_text(name, corpus_lines, botchan_text):
    v = get_test_vocab(name)
    texts = sample_texts(corpus_lines, botchan_text)
    ids = encode_with_specials(v, texts)
    start, end, lead = A.token_spans(v, ids, None, texts)
    for b, (t, row) in enumerate(zip(texts, ids)):
        tb = t.encode("utf-8")
        prev = 0
        for j, i in enumerate(row):
            s, e, l = int(start[b, j]), int(end[b, j]), int(lead[b, j])
            assert prev <= s <= e <= len(tb)
            prev = e
            tok = v.token_bytes(i)
            if tok is None:
                if v.specials.get(i) != "unk":
                    assert s == e
                continue
            if v.lossy_normalizer is None:
                # the token's bytes are exactly the text's bytes there (minus a dummy-prefix space)
                assert tok[l:] == tb[s:e], (b, j, tok, tb[s:e])
                assert l in (0, 1) and (l == 0 or tok[:1] == b" ")
            else:
                norm = v.normalize(tb[s:e].decode("utf-8", errors="strict"))
                assert "".join(norm.split()).encode() == tok.strip(), (b, j, tok, tb[s:e])
        if v.lossy_normalizer is None:
            # everything the ids spell is covered, nothing else
            spelled = b"".join((v.token_bytes(i) or b"")[int(lead[b, j]):] for j, i in enumerate(row))
            assert spelled == tb


def test_token_spans_bruteforce_roundtrip_vocab(corpus_lines, botchan_text):
    """For a byte-level vocabulary the spans are the cumulative token lengths."""
    v = get_test_vocab("llama3")
    texts = sample_texts(corpus_lines, botchan_text)
    ids = [v.encode(t) for t in texts]
    start, end, _ = A.token_spans(v, ids, None, texts)
    for b, row in enumerate(ids):
        lengths = [len(v.token_bytes(i)) for i in row]
        cum = np.concatenate([[0], np.cumsum(lengths)])
        assert start[b, : len(row)].tolist() == cum[:-1].tolist()
        assert end[b, : len(row)].tolist() == cum[1:].tolist()


def test_token_spans_reject_ids_of_another_text():
    v = get_test_vocab("gpt2")
    with pytest.raises(ValueError, match="does not match the text"):
        A.token_spans(v, [v.encode("hello world")], None, ["hello there"])
    with pytest.raises(ValueError, match="cover"):
        A.token_spans(v, [v.encode("hello")], None, ["hello world"])
    with pytest.raises(ValueError, match="texts for"):
        A.token_spans(v, [v.encode("a")], None, ["a", "b"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        A.token_spans(v, [[len(v) + 3]], None, ["a"])


# ---------------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher,student", PAIRS)
def test_alignment_matches_bruteforce(teacher, student, corpus_lines, botchan_text):
    tv, sv = get_test_vocab(teacher), get_test_vocab(student)
    amap = get_map(teacher, student)
    texts = sample_texts(corpus_lines, botchan_text)
    t_ids = encode_with_specials(tv, texts)
    s_ids = encode_with_specials(sv, texts)
    K = 6
    a = A.align(t_ids, s_ids, amap=amap, texts=texts, byte_queries=K, threads=2)
    check_against_brute(a, t_ids, s_ids, tv, sv, amap, K)
    # every chunk has its bytes covered by both sides' tokens
    for b in range(len(texts)):
        n = int(a.n_chunks[b])
        assert n > 0
        starts, ends = a.chunk_start[b, :n], a.chunk_end[b, :n]
        assert (ends[1:] >= starts[1:]).all() and (starts[1:] >= ends[:-1]).all()


def test_identical_tokenizers_align_token_by_token(corpus_lines, botchan_text):
    v = get_test_vocab("llama3")
    texts = sample_texts(corpus_lines, botchan_text)
    ids = encode_with_specials(v, texts)
    a = A.align(ids, ids, teacher_vocab=v, student_vocab=v, texts=texts, byte_queries=3)
    for b, row in enumerate(ids):
        n = len(row)
        assert a.t_chunk[b, :n].tolist() == list(range(n)) == a.s_chunk[b, :n].tolist()
        assert a.s_teacher_row[b, :n].tolist() == list(range(-1, n - 1))
        assert a.s_at_boundary[b, :n].all() and a.s_ends_teacher[b, :n].all()
        assert (a.s_prefix[b, :n] == 0).all()
        # the byte queries of byte i > 0 sit inside the same teacher token, under its prefix
        for j in range(1, n - 1):
            tb = v.token_bytes(row[j])
            for i in range(1, min(3, len(tb))):
                assert a.byte_row[b, j, i] == j - 1
                assert a.byte_prefix[b, j, i] == v.trie.lookup(tb[:i])


def test_alignment_without_texts_uses_the_spelled_bytes(corpus_lines):
    tv, sv = get_test_vocab("llama3"), get_test_vocab("mistral-v1")
    texts = [l for l in corpus_lines if len(l) > 20][:4]
    t_ids = [tv.encode(t) for t in texts]
    s_ids = [sv.encode(t) for t in texts]
    a1 = A.align(t_ids, s_ids, teacher_vocab=tv, student_vocab=sv, texts=texts)
    a2 = A.align(t_ids, s_ids, teacher_vocab=tv, student_vocab=sv)
    for k, v in a1.as_dict().items():
        if hasattr(v, "shape"):
            assert (v == getattr(a2, k)).all(), k
    with pytest.raises(ValueError, match="not the same text"):
        A.align(t_ids[:1], s_ids[1:2], teacher_vocab=tv, student_vocab=sv)


def test_padding_changes_nothing(corpus_lines):
    tv, sv = get_test_vocab("llama3"), get_test_vocab("mistral-v1")
    amap = get_map("llama3", "mistral-v1")
    texts = [l for l in corpus_lines if len(l) > 20][:3]
    t_ids = encode_with_specials(tv, texts)
    s_ids = encode_with_specials(sv, texts)
    a = A.align(t_ids, s_ids, amap=amap, texts=texts, byte_queries=4)
    # the same rows one at a time, and padded wider with junk ids past the lengths
    for b in range(len(texts)):
        one = A.align([t_ids[b]], [s_ids[b]], amap=amap, texts=[texts[b]], byte_queries=4)
        nt, ns = len(t_ids[b]), len(s_ids[b])
        tp = np.full((1, nt + 7), 13, np.int32); tp[0, :nt] = t_ids[b]
        sp = np.full((1, ns + 5), 17, np.int32); sp[0, :ns] = s_ids[b]
        wide = A.align(tp, sp, amap=amap, texts=[texts[b]], teacher_lengths=[nt], student_lengths=[ns],
                       byte_queries=4)
        for other in (one, wide):
            assert other.s_teacher_row[0, :ns].tolist() == a.s_teacher_row[b, :ns].tolist()
            assert other.s_chunk[0, :ns].tolist() == a.s_chunk[b, :ns].tolist()
            assert other.t_chunk[0, :nt].tolist() == a.t_chunk[b, :nt].tolist()
            assert other.s_consumed[0, :ns].tolist() == a.s_consumed[b, :ns].tolist()
            assert other.byte_prefix[0, :ns].tolist() == a.byte_prefix[b, :ns].tolist()
            assert (other.s_teacher_row[0, ns:] == -1).all() and (other.t_chunk[0, nt:] == -1).all()


def test_special_tokens_are_matched_by_role_and_position():
    tv, sv = get_test_vocab("llama3"), get_test_vocab("mistral-v1")
    amap = get_map("llama3", "mistral-v1")
    text = "Hello there"
    bos_t, eos_t = tv.special_ids["bos"], tv.special_ids["eos"]
    bos_s, eos_s = sv.special_ids["bos"], sv.special_ids["eos"]
    # teacher: bos text eos; student: text eos eos (an extra eos, and no bos)
    t_ids = [[bos_t] + tv.encode(text) + [eos_t]]
    s_ids = [sv.encode(text) + [eos_s, eos_s]]
    a = A.align(t_ids, s_ids, amap=amap, texts=[text])
    ns, nt = len(s_ids[0]), len(t_ids[0])
    # the first eos matches the teacher's eos (own chunk, predicted by the row before it)
    assert a.s_teacher_row[0, ns - 2] == nt - 2
    assert a.s_chunk[0, ns - 2] == a.t_chunk[0, nt - 1] >= 0
    assert a.chunk_special[0, a.s_chunk[0, ns - 2]] == 1
    # the second eos has no counterpart: no teacher prediction, no chunk
    assert a.s_teacher_row[0, ns - 1] == -1 and a.s_chunk[0, ns - 1] == -1
    # the teacher's bos has no student counterpart: chunk -1; the first student token is
    # predicted by the teacher's bos row
    assert a.t_chunk[0, 0] == -1
    assert a.s_teacher_row[0, 0] == 0
    del bos_s


def test_bad_input_gives_clear_errors():
    tv, sv = get_test_vocab("llama3"), get_test_vocab("mistral-v1")
    amap = get_map("llama3", "mistral-v1")
    with pytest.raises(ValueError, match="rows"):
        A.align([tv.encode("a b")], [sv.encode("a b"), sv.encode("c")], amap=amap)
    with pytest.raises(ValueError, match="does not match the text"):
        A.align([tv.encode("a b")], [sv.encode("a c")], amap=amap, texts=["a b"])
    with pytest.raises(ValueError, match="outside"):
        A.align(np.array([[1, 2]]), np.array([[1, 2]]), amap=amap, teacher_lengths=[3], student_lengths=[2])
    # spans that overlap or run backwards, given directly
    ids = np.array([[10, 11]], np.int32)
    spans = (np.array([[0, 1]]), np.array([[2, 3]]), None)
    ok = (np.array([[0, 2]]), np.array([[2, 3]]), None)
    with pytest.raises(ValueError, match="overlap"):
        A.align_spans(ids, spans, [2], ids, ok, [2], teacher_vocab=tv, student_vocab=sv)
    # empty sequences are fine: no chunks, nothing predicted
    a = A.align([[]], [[]], amap=amap, texts=[""])
    assert int(a.n_chunks[0]) == 0 and a.s_chunk.shape == (1, 0)


def test_alignment_speed_64x1024(botchan_text):
    """64 texts of 1024 teacher tokens: the compiled alignment takes milliseconds (measured, printed;
    asserted only against a loose bound)."""
    tv, sv = get_test_vocab("llama3"), get_test_vocab("mistral-v1")
    amap = get_map("llama3", "mistral-v1")
    base = tv.encode(botchan_text)
    rows = [base[(i * 97) % 2000:(i * 97) % 2000 + 1024] for i in range(64)]
    texts = [tv.decode_bytes(r).decode("utf-8", errors="ignore") for r in rows]
    t_ids = [tv.encode(t) for t in texts]
    s_ids = [sv.encode(t) for t in texts]
    t_ids, t_len = A.pad_ids(t_ids)
    s_ids, s_len = A.pad_ids(s_ids)
    t_spans = A.token_spans(tv, t_ids, t_len, texts)
    s_spans = A.token_spans(sv, s_ids, s_len, texts)
    dec = amap.trie_arrays("dec_trie")

    def core(threads, K=0):
        return A.align_spans(t_ids, t_spans, t_len, s_ids, s_spans, s_len, teacher_vocab=tv, student_vocab=sv,
                             dec_trie=dec, threads=threads, byte_queries=K)
    core(1)
    times = {}
    for label, fn in [("align 1 thread", lambda: core(1)), ("align 2 threads", lambda: core(2)),
                      ("align + 10 byte queries", lambda: core(1, 10)),
                      ("spans both sides", lambda: (A.token_spans(tv, t_ids, t_len, texts),
                                                    A.token_spans(sv, s_ids, s_len, texts))),
                      ("align() end to end", lambda: A.align(t_ids, s_ids, amap=amap, texts=texts,
                                                             teacher_lengths=t_len, student_lengths=s_len))]:
        best = min(_timed(fn) for _ in range(3))
        times[label] = best
    print("\n" + ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in times.items()),
          f"({int(t_len.sum())} teacher, {int(s_len.sum())} student tokens)")
    assert times["align 1 thread"] < 0.5


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_hf_character_offsets_convert_to_the_same_byte_spans(corpus_lines):
    """HF tokenizers report character offsets; converted to UTF-8 byte offsets they give the spans
    token_spans finds (for tokens that do not split a character)."""
    from tokenizers import Tokenizer
    from ctalign import assets
    tok = Tokenizer.from_file(str(assets.path("llama3")))
    v = get_test_vocab("llama3")
    for text in [l for l in corpus_lines if len(l) > 20][:8]:
        enc = tok.encode(text, add_special_tokens=False)
        got = A.char_to_byte_offsets(text, enc.offsets)
        start, end, _ = A.token_spans(v, [enc.ids], None, [text])
        for j, (a, b) in enumerate(got.tolist()):
            whole = len(v.token_bytes(enc.ids[j]).decode("utf-8", errors="replace").encode("utf-8")) == \
                len(v.token_bytes(enc.ids[j]))
            if whole:
                assert (a, b) == (int(start[0, j]), int(end[0, j])), (text, j)
    with pytest.raises(ValueError, match="character offsets"):
        A.char_to_byte_offsets("abc", [(0, 4)])


def test_vocabularies_the_map_was_not_built_for_are_refused():
    from ctalign import align as A
    from ctalign.data import DistillationCollator
    from ctalign.alignment_map import build_map
    from ctalign.errors import MapMismatchError
    amap = build_map(get_test_vocab("gpt2-tiktoken"), get_test_vocab("mistral-v1"))
    other = get_test_vocab("botchan-unigram")
    with pytest.raises(MapMismatchError, match="student"):
        DistillationCollator(amap, student_vocab=other)
    with pytest.raises(MapMismatchError, match="teacher"):
        A.vocabs_of_map(amap, other, None, "align()")
    t, s = A.vocabs_of_map(amap, None, None, "align()")
    assert t is amap.teacher and s is amap.student
