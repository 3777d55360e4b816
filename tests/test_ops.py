"""Projection ops (ctalign.ops) on real tokenizer pairs: brute force, pure-torch reference, compiled
CPU kernels, sparse rows, telescoping, autograd, dtypes, padding, temperature and bad input.

Pairs (three families): SentencePiece BPE -> byte-level BPE (mistral-v1 -> llama3), tiktoken ->
byte-level BPE (qwen -> deepseek-v3), byte-level BPE -> its shrunk first-merges student (llama3 ->
4000 tokens, the subset regime). gradcheck runs on the small real botchan models.
"""
from __future__ import annotations

import math

import _brute_force as bf
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ctalign import _core, ops
from ctalign.ops import _cpu_backend
from ctalign.errors import MapMismatchError, NonFiniteLogitsError
from ctalign.ops import TopK
from ops_checks import TOL, assert_logs_close, logits_for, node_prefixes, reference_of, same_sequence_logprob

PAIRS = {
    "spm->bbpe": ("mistral-v1", "llama3"),
    "tiktoken->bbpe": ("qwen", "deepseek-v3"),
    "bpe->shrunk": ("llama3", "llama3-shrunk"),
}


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shrunk_llama3(tmp_path_factory, load_test_vocab):
    from ctalign.shrink import shrink_vocab
    from ctalign.vocab import load_vocab
    out = tmp_path_factory.mktemp("shrunk-llama3")
    shrink_vocab(load_test_vocab("llama3"), 4000, out)
    return load_vocab(out, name="llama3-shrunk")


@pytest.fixture(scope="session")
def vocab_of(load_test_vocab, shrunk_llama3):
    return lambda name: shrunk_llama3 if name == "llama3-shrunk" else load_test_vocab(name)


@pytest.fixture(scope="session")
def map_of(vocab_of):
    from ctalign import build_map
    cache = {}

    def get(teacher: str, student: str):
        if (teacher, student) not in cache:
            cache[teacher, student] = build_map(vocab_of(teacher), vocab_of(student))
        return cache[teacher, student]
    return get


@pytest.fixture(scope="session")
def small(map_of, vocab_of):
    """The small real pair for gradcheck: botchan BPE 1k -> botchan Unigram 1k."""
    return vocab_of("botchan-bpe"), vocab_of("botchan-unigram"), map_of("botchan-bpe", "botchan-unigram")


@pytest.fixture(params=list(PAIRS), scope="module")
def pair(request, vocab_of, map_of):
    t, s = PAIRS[request.param]
    return vocab_of(t), vocab_of(s), map_of(t, s)


@pytest.fixture(scope="session")
def text_tokens(corpus_text, botchan_text):
    """Teacher tokens of real text, per vocabulary: (ids) a sample of 48 positions with bytes."""
    cache = {}

    def get(vocab, n=48, seed=0):
        key = (vocab.name, n, seed)
        if key not in cache:
            ids = vocab.encode(botchan_text[:3000] + corpus_text[:3000])
            ids = [t for t in ids if vocab.token_bytes(t)]
            rng = np.random.default_rng(seed)
            cache[key] = [int(t) for t in rng.choice(ids, size=n, replace=False)]
        return cache[key]
    return get


# ---- teacher side: bytes -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mistral-v1", "qwen", "llama3"])
def test_next_byte_equals_brute_force_and_reference(name, vocab_of):
    vocab = vocab_of(name)
    V = len(vocab)
    x = logits_for(4, V, seed=1)
    out = ops.next_byte_logprobs(x, vocab)
    assert ops.last_backend() == "cpu"
    assert out.shape == (4, 257) and out.dtype == torch.float32
    assert_logs_close(out, reference_of(ops.next_byte_logprobs, x, vocab), what="reference")
    assert_logs_close(out[0], bf.next_byte(bf.softmax64(x[0], V), vocab), what="brute force")
    assert (out.double().exp().sum(-1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["mistral-v1", "qwen"])
def test_byte_conditionals_equal_brute_force_and_reference(name, vocab_of, text_tokens):
    vocab = vocab_of(name)
    V, trie = len(vocab), vocab.trie
    prefixes = [b""] + node_prefixes(vocab, text_tokens(vocab, 12))
    nodes = [trie.lookup(p) for p in prefixes]
    rows = [i % 3 for i in range(len(nodes))]
    x = logits_for(3, V, seed=2)
    for drop_end in (False, True):
        out = ops.byte_conditional_logprobs(x, vocab, rows, nodes, drop_end=drop_end)
        assert out.shape == (len(nodes), 256 if drop_end else 257)
        ref = reference_of(ops.byte_conditional_logprobs, x, vocab, rows, nodes, drop_end=drop_end)
        assert_logs_close(out, ref, what=f"reference drop_end={drop_end}")
        sums = out.double().exp().sum(-1)
        has_mass = torch.isfinite(out).any(-1)  # drop_end: a leaf prefix has no continuing tokens
        assert (sums[has_mass] - 1).abs().max() < 1e-5 and (sums[~has_mass] == 0).all()
        masses = bf.byte_masses(bf.softmax64(x[0], V), vocab)
        for q in [i for i in range(len(nodes)) if rows[i] == 0][:8]:
            assert_logs_close(out[q], bf.byte_conditional(masses, prefixes[q], drop_end),
                              what=f"brute force {prefixes[q]!r} drop_end={drop_end}")


@pytest.mark.parametrize("name", ["mistral-v1", "qwen", "llama3", "deepseek-v3"])
def test_byte_conditionals_telescope_to_token_probability(name, vocab_of, text_tokens):
    """next_byte(b1) + sum_i cond(b<i)[b_i] + cond(bytes(t))[end] = log p(t), for real text tokens."""
    vocab = vocab_of(name)
    V, trie = len(vocab), vocab.trie
    tokens = text_tokens(vocab)
    x = logits_for(len(tokens), V, seed=3, scale=4.0)
    first = ops.next_byte_logprobs(x, vocab)
    rows, nodes, cols, owner = [], [], [], []
    for r, t in enumerate(tokens):
        b = vocab.token_bytes(t)
        for i in range(1, len(b) + 1):
            rows.append(r)
            nodes.append(trie.lookup(b[:i]))
            cols.append(b[i] if i < len(b) else 256)
            owner.append(r)
    cond = ops.byte_conditional_logprobs(x, vocab, rows, nodes)
    picked = cond[torch.arange(len(cols)), torch.tensor(cols)].double()
    total = torch.zeros(len(tokens), dtype=torch.float64).index_add(0, torch.tensor(owner), picked)
    total += first[torch.arange(len(tokens)), torch.tensor([vocab.token_bytes(t)[0] for t in tokens])].double()
    assert (total - same_sequence_logprob(x, V, tokens, vocab.ids_of_bytes, vocab.token_bytes)).abs().max() < TOL


# ---- map side: student pieces --------------------------------------------------------------------
def test_project_to_student_equals_brute_force_and_reference(pair):
    teacher, student, amap = pair
    V = len(teacher)
    x = logits_for(3, V, seed=4)
    out = ops.project_to_student(x, amap)
    assert out.shape == (3, len(student) + 1)
    assert_logs_close(out, reference_of(ops.project_to_student, x, amap), what="reference")
    decs = bf.dec_sequences(amap)
    assert_logs_close(out[0], bf.project_to_student(bf.softmax64(x[0], V), amap, teacher, student, decs), what="brute force")
    assert (out.double().exp().sum(-1) - 1).abs().max() < 1e-5


def test_cover_logmass_equals_brute_force_and_reference(pair):
    teacher, student, amap = pair
    V = len(teacher)
    x = logits_for(2, V, seed=5)
    out = ops.cover_logmass(x, amap)
    assert out.shape == (2, len(student))
    assert_logs_close(out, reference_of(ops.cover_logmass, x, amap), what="reference")
    masses = bf.byte_masses(bf.softmax64(x[1], V), teacher)
    assert_logs_close(out[1], bf.cover(masses, student), what="brute force")


def test_project_within_telescopes_and_equals_brute_force(pair, text_tokens):
    """project_to_student(d1) + sum_i within(d<i)[d_i] + within(dec_S(t))[end] = log p(t)."""
    teacher, student, amap = pair
    V, Vs, dec_trie = len(teacher), len(student), amap.dec_trie
    tokens = text_tokens(teacher, 24, seed=1)
    x = logits_for(len(tokens), V, seed=6, scale=4.0)
    first = ops.project_to_student(x, amap)
    rows, nodes, cols, owner, prefixes = [], [], [], [], []
    for r, t in enumerate(tokens):
        d = amap.dec(t)
        for i in range(1, len(d) + 1):
            rows.append(r)
            nodes.append(dec_trie.lookup(d[:i]))
            prefixes.append(tuple(d[:i]))
            cols.append(d[i] if i < len(d) else Vs)
            owner.append(r)
    within = ops.project_to_student_within(x, amap, rows, nodes)
    assert within.shape == (len(nodes), Vs + 1)
    assert (within.double().exp().sum(-1) - 1).abs().max() < 1e-5
    picked = within[torch.arange(len(cols)), torch.tensor(cols)].double()
    total = torch.zeros(len(tokens), dtype=torch.float64).index_add(0, torch.tensor(owner), picked)
    total += first[torch.arange(len(tokens)), torch.tensor([amap.dec(t)[0] for t in tokens])].double()
    by_dec = {}
    for t in range(V):
        by_dec.setdefault(tuple(amap.dec(t)), []).append(t)
    want = same_sequence_logprob(x, V, tokens, lambda d: by_dec[d], lambda t: tuple(amap.dec(t)))
    assert (total - want).abs().max() < TOL
    # reference on every query, brute force on a few of row 0's
    assert_logs_close(within, reference_of(ops.project_to_student_within, x, amap, rows, nodes), what="reference")
    masses = bf.dec_masses(bf.softmax64(x[0], V), bf.dec_sequences(amap))
    for q in [i for i in range(len(rows)) if rows[i] == 0][:3]:
        assert_logs_close(within[q], bf.project_within(masses, prefixes[q], Vs), what=f"brute force {prefixes[q]}")


def test_conditionals_at_the_root_exclude_specials(pair):
    teacher, _, amap = pair
    x = logits_for(1, len(teacher), seed=7)
    root = ops.byte_conditional_logprobs(x, teacher, [0], [0])
    first = ops.next_byte_logprobs(x, teacher)
    with_bytes = torch.logsumexp(first[0, :256].double(), 0)
    assert_logs_close(root[0, :256], first[0, :256].double() - with_bytes, what="root")
    assert torch.isneginf(root[0, 256])


# ---- sparse rows ---------------------------------------------------------------------------------
def test_sparse_rows_equal_dense_when_k_covers_the_vocabulary(pair, text_tokens):
    teacher, _, amap = pair
    V, trie = len(teacher), teacher.trie
    x = logits_for(2, V, seed=8, pad=0)
    lp = torch.log_softmax(x.double(), -1).float()
    perm = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(r)) for r in range(2)])
    topk = TopK(perm, lp.gather(1, perm))
    nodes = [trie.lookup(p) for p in node_prefixes(teacher, text_tokens(teacher, 4))]
    rows = [i % 2 for i in range(len(nodes))]
    dec_nodes = [amap.dec_trie.lookup(amap.dec(t)[:1]) for t in text_tokens(teacher, 4)]
    for op, args in ((ops.next_byte_logprobs, (teacher,)), (ops.project_to_student, (amap,)),
                     (ops.cover_logmass, (amap,)), (ops.byte_conditional_logprobs, (teacher, rows, nodes)),
                     (ops.project_to_student_within, (amap, [0, 1, 0, 1], dec_nodes))):
        dense = op(x, *args)
        for backend in (None, "reference"):  # compiled sparse rows on CPU, and the pure-torch path
            with ops.force_backend(backend):
                sparse = op(topk, *args)
            assert ops.last_backend() == "topk"
            assert_logs_close(sparse, dense, what=f"{op.__name__} {backend}")



def test_sparse_rows_with_few_entries_equal_dense_rows_holding_only_them(pair, text_tokens):
    """k = 64 entries (the conditionals' sparse path: each entry finds its child of the query node;
    cover: each entry reaches the student tokens that prefix it) against dense rows whose other
    columns carry no mass, at the dec-trie root (one child per first student piece) and below."""
    teacher, _, amap = pair
    V, trie = len(teacher), teacher.trie
    toks = text_tokens(teacher, 6, seed=5)
    kept = []
    for r in range(2):
        ids = torch.randperm(V, generator=torch.Generator().manual_seed(40 + r))
        ids = torch.cat([torch.tensor(toks), ids[~torch.isin(ids, torch.tensor(toks))]])[:64]
        kept.append(ids)
    idx = torch.stack(kept)
    raw = logits_for(2, V, seed=41, pad=0).gather(1, idx)
    lp = torch.log_softmax(raw.double(), -1)  # the kept entries hold all the mass
    x = torch.full((2, V), -1e4, dtype=torch.float64).scatter(1, idx, lp)
    topk = TopK(idx, lp.float())
    nodes = [0] + [trie.lookup(p) for p in node_prefixes(teacher, toks)][:10]
    dec_nodes = [0] + [amap.dec_trie.lookup(amap.dec(t)[:1]) for t in toks]
    for op, args in ((ops.cover_logmass, (amap,)),
                     (ops.byte_conditional_logprobs, (teacher, [i % 2 for i in range(len(nodes))], nodes)),
                     (ops.project_to_student_within, (amap, [i % 2 for i in range(len(dec_nodes))], dec_nodes))):
        for kw in ({}, {"temperature": 0.7}):
            if kw and op is ops.cover_logmass:
                continue  # a tempered TopK keeps its kept mass (the dense softmax renormalises): ratios only
            sparse = op(topk, *args, **kw)
            assert ops.last_backend() == "topk"
            dense = op(x.float(), *args, **kw)
            assert_logs_close(sparse, dense, what=f"{op.__name__} {kw}")
    drop = ops.byte_conditional_logprobs(topk, teacher, [0] * len(nodes), nodes, drop_end=True)
    assert_logs_close(drop, ops.byte_conditional_logprobs(x.float(), teacher, [0] * len(nodes), nodes, drop_end=True),
                      what="drop_end")

def test_sparse_projection_scatters_back_to_the_dense_projection(pair):
    """project_to_student(TopK, sparse=True): the same masses as the dense output, O(k) ids per row."""
    teacher, student, amap = pair
    V, n_out = len(teacher), len(student) + 1
    x = logits_for(5, V, seed=13, pad=0)
    lp = torch.log_softmax(x.double(), -1).float()
    top = torch.topk(lp, 64, dim=-1)
    values = top.values.clone()
    values[1, -5:] = float("-inf")  # zero-mass entries: their groups are listed at -inf
    topk = TopK(top.indices, values)
    dense = ops.project_to_student(topk, amap, temperature=0.7)
    results = {}
    for backend in (None, "reference"):
        with ops.force_backend(backend):
            results[backend] = ops.project_to_student(topk, amap, temperature=0.7, sparse=True)
        assert ops.last_backend() == "topk"
    compiled, torch_path = results[None], results["reference"]
    assert torch.equal(compiled.indices, torch_path.indices)
    assert_logs_close(compiled.logprobs, torch_path.logprobs, what="compiled vs pure torch")
    for out in (compiled, torch_path):
        assert out.indices.shape == (5, 64) and out.indices.dtype == torch.int64
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < n_out
        assert all(len(set(row.tolist())) == 64 for row in out.indices)  # distinct ids: a valid TopK
        scattered = torch.full((5, n_out), float("-inf")).scatter(1, out.indices, out.logprobs)
        assert_logs_close(scattered, dense, what="scattered sparse projection")
    # Brute force for one row: group the kept entries by dec_S(t)[0] (specials by the map's group).
    group = np.asarray(amap.first_student)
    mass = {}
    for t, v in zip(top.indices[0].tolist(), torch.log_softmax(values[0].double() / 0.7, -1).tolist()):
        mass[int(group[t])] = mass.get(int(group[t]), 0.0) + np.exp(v + torch.logsumexp(values[0].double(), 0).item())
    row = compiled
    used = [(int(i), float(l)) for i, l in zip(row.indices[0], row.logprobs[0]) if l > float("-inf")]
    assert sorted(i for i, _ in used) == sorted(mass)
    for i, l in used:
        assert abs(l - np.log(mass[i])) < TOL
    # Sparse output of the sparse output's own kind: a TopK the ops accept back as rows.
    assert isinstance(compiled, TopK)



def test_sparse_within_and_cover_scatter_back_to_their_dense_outputs(pair, text_tokens):
    """project_to_student_within / cover_logmass (TopK, sparse=True): distinct in-range ids, the reached
    ones first in increasing order (zero-mass ones at -inf), then padding at -inf, and the dense-output
    TopK result once scattered."""
    teacher, student, amap = pair
    V, n_s = len(teacher), len(student)
    x = logits_for(3, V, seed=14, pad=0)
    top = torch.topk(torch.log_softmax(x.double(), -1).float(), 48, dim=-1)
    values = top.values.clone()
    values[2, -4:] = float("-inf")
    topk = TopK(top.indices, values)
    toks = text_tokens(teacher, 5, seed=6)
    consumed = [0] + [amap.dec_trie.lookup(amap.dec(t)[:1]) for t in toks]
    rows = [i % 3 for i in range(len(consumed))]
    cases = (("within", lambda **kw: ops.project_to_student_within(topk, amap, rows, consumed, temperature=0.8, **kw),
              n_s + 1, min(48, n_s + 1)),
             ("cover", lambda **kw: ops.cover_logmass(topk, amap, **kw), n_s, None))
    for name, fn, n_cols, width in cases:
        dense = fn()
        out = fn(sparse=True)  # compiled on CPU
        assert isinstance(out, TopK) and ops.last_backend() == "topk"
        with ops.force_backend("reference"):
            torch_path = fn(sparse=True)  # pure torch: the same ids in the same order
        assert torch.equal(out.indices, torch_path.indices), name
        assert_logs_close(out.logprobs, torch_path.logprobs, what=f"{name}: compiled vs pure torch")
        n_rows = dense.shape[0]
        used = torch.isfinite(dense).sum(-1)
        if width is None:  # cover: the most student tokens a row's kept entries reach, zero-mass ones too
            reach = ops.cover_logmass(TopK(topk.indices, torch.full_like(values, -1.0)), amap)
            width = int(torch.isfinite(reach).sum(-1).max())
        assert out.indices.shape == (n_rows, width), name
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < n_cols
        for r in range(n_rows):
            ids = out.indices[r].tolist()
            assert len(set(ids)) == len(ids), f"{name}: row {r} repeats an id"
            finite = torch.isfinite(out.logprobs[r])
            assert int(finite.sum()) == int(used[r])
            got = out.indices[r][finite].tolist()
            assert got == sorted(got) and (not got or got[0] == ids[0])  # reached ids first, in order
        scattered = torch.full((n_rows, n_cols), float("-inf")).scatter(1, out.indices, out.logprobs)
        assert_logs_close(scattered, dense, what=f"scattered sparse {name}")
    with pytest.raises(TypeError, match="sparse=True needs TopK"):
        ops.cover_logmass(x, amap, sparse=True)
    for backend in (None, "reference"):
        with ops.force_backend(backend):
            with pytest.raises(ValueError, match="cover_logmass: .*row 1 .*more than once"):
                ops.cover_logmass(TopK(torch.tensor([[1, 2], [3, 3]]), torch.full((2, 2), -1.0)), amap, sparse=True)
            with pytest.raises(ValueError, match="project_to_student_within: .*row 0 holds NaN"):
                ops.project_to_student_within(TopK(torch.tensor([[1, 2]]), torch.tensor([[-1.0, float("nan")]])), amap,
                                              [0], [0], sparse=True)
    with pytest.raises(TypeError, match="sparse=True needs TopK"):
        ops.project_to_student_within(x, amap, [0], [0], sparse=True)
    lp = values[:2, :8].double().clamp(min=-30).requires_grad_()  # gradients through the sparse outputs
    for fn in (lambda y: ops.project_to_student_within(TopK(top.indices[:2, :8], y), amap, [0, 1, 1], consumed[:3],
                                                       sparse=True).logprobs,
               lambda y: ops.cover_logmass(TopK(top.indices[:2, :8], y), amap, sparse=True).logprobs):
        assert torch.autograd.gradcheck(_finite_part(fn, lp), (lp,), fast_mode=True)


def test_sparse_outputs_keep_tiny_masses(pair):
    """A conditional is a ratio: entries far below e^-87 (float's exp range) still define it, on the
    compiled and the torch path alike; cover keeps log masses down to e^-700 as given."""
    teacher, _, amap = pair
    dec = ops._map_tables(amap)[2]
    cs, cn, lo, hi = (torch.from_numpy(a.astype(np.int64)) for a in dec.nodes_np[:4])
    order, rank = dec.host["order"].long(), dec.host["rank"]
    v = next(i for i in range(1, dec.n_nodes) if cs[i + 1] - cs[i] >= 2)
    t1, t2 = int(order[lo[cn[cs[v]]]]), int(order[lo[cn[cs[v] + 1]]])
    other = next(t for t in order.tolist() if not (lo[v] <= rank[t] < hi[v]))
    topk = TopK(torch.tensor([[other, t1, t2]]), torch.tensor([[-1e-3, -95.0, -96.0]]))
    want = [math.log(1 / (1 + math.exp(-1))), math.log(math.exp(-1) / (1 + math.exp(-1)))]
    for backend in (None, "reference"):
        with ops.force_backend(backend):
            out = ops.project_to_student_within(topk, amap, [0], [v], sparse=True)
            cover = ops.cover_logmass(TopK(torch.tensor([[t2]]), torch.tensor([[-100.0]])), amap, sparse=True)
        got = sorted(out.logprobs[0][torch.isfinite(out.logprobs[0])].tolist(), reverse=True)
        assert len(got) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(got, want)), (backend, got)
        reached = cover.logprobs[torch.isfinite(cover.logprobs)]  # the student tokens that prefix t2
        assert reached.numel() >= 1 and torch.allclose(reached, torch.full_like(reached, -100.0)), (backend, reached)


def test_outputs_without_mass_carry_no_gradient_on_every_backend(small):
    """Upstream gradient on -inf outputs (e.g. an empty end column) reaches no logit, on the compiled
    kernels and the pure-torch path alike."""
    teacher, _, _ = small
    x = logits_for(1, len(teacher), seed=33, pad=0, dtype=torch.float64).requires_grad_()
    for node in (0, 3, 50):
        for backend in ("cpu", "reference"):
            with ops.force_backend(backend):
                out = ops.byte_conditional_logprobs(x, teacher, [0], [node])
            none = torch.isneginf(out)
            assert none.any()
            (gx,) = torch.autograd.grad(out, x, none.double())
            assert float(gx.abs().sum()) == 0.0, (node, backend)

def test_sparse_projection_pads_and_refuses_dense_logits(small):
    teacher, student, amap = small
    V = len(teacher)
    group = np.asarray(amap.first_student)
    same = [t for t in range(V) if group[t] == group[5]][:3]
    others = [t for t in range(V) if group[t] not in (group[5],)][:2]
    idx = torch.tensor([same + others])
    lp = torch.log_softmax(torch.randn(1, len(same) + len(others), generator=torch.Generator().manual_seed(1)), -1)
    for backend in (None, "reference"):
        with ops.force_backend(backend):
            out = ops.project_to_student(TopK(idx, lp), amap, sparse=True)
        u = len({int(group[t]) for t in same + others})
        assert torch.isfinite(out.logprobs[0, :u]).all() and torch.isneginf(out.logprobs[0, u:]).all()
        assert out.indices[0, :u].tolist() == sorted({int(group[t]) for t in same + others})
        assert len(set(out.indices[0].tolist())) == idx.shape[1]
    with pytest.raises(TypeError, match="sparse=True needs TopK"):
        ops.project_to_student(torch.randn(1, V), amap, sparse=True)
    with pytest.raises(ValueError, match="more than once"):
        ops.project_to_student(TopK(torch.tensor([[0, 0]]), torch.tensor([[-1.0, -2.0]])), amap, sparse=True)


def test_sparse_rows_use_the_kept_mass_as_given(vocab_of):
    vocab = vocab_of("mistral-v1")
    V = len(vocab)
    x = logits_for(1, V, seed=9, pad=0)
    lp = torch.log_softmax(x.double(), -1)
    top = torch.topk(lp, 64, dim=-1)
    out = ops.next_byte_logprobs(TopK(top.indices, top.values.float()), vocab)
    kept = np.zeros(V)
    kept[top.indices[0].numpy()] = top.values[0].exp().numpy()
    assert_logs_close(out[0], bf.next_byte(kept, vocab), what="kept mass")
    assert abs(out.double().exp().sum().item() - kept.sum()) < 1e-6  # no renormalisation


def test_sparse_rows_with_temperature_keep_their_mass(vocab_of):
    vocab = vocab_of("botchan-bpe")
    V = len(vocab)
    x = logits_for(2, V, seed=10, pad=0)
    full = TopK(torch.arange(V).expand(2, V), torch.log_softmax(x.double(), -1).float())
    assert_logs_close(ops.next_byte_logprobs(full, vocab, temperature=0.7),
                      ops.next_byte_logprobs(x, vocab, temperature=0.7), what="k = V")
    top = torch.topk(x, 50, -1)
    sparse = TopK(top.indices, torch.log_softmax(x, -1).gather(1, top.indices))
    kept = torch.logsumexp(sparse.logprobs.double(), -1)
    hot = ops.next_byte_logprobs(sparse, vocab, temperature=2.0)
    assert torch.allclose(torch.logsumexp(hot.double(), -1), kept, atol=1e-6)


# ---- autograd ------------------------------------------------------------------------------------
def _finite_part(fn, x):
    """fn restricted to the outputs that are finite at x (gradcheck cannot difference -inf)."""
    with torch.no_grad():
        mask = torch.isfinite(fn(x))
    return lambda y: fn(y)[mask]


def test_gradcheck_float64_on_real_small_vocabularies(small):
    teacher, _, amap = small
    V = len(teacher)
    trie, dec_trie = teacher.trie, amap.dec_trie
    toks = [t for t in teacher.encode("the cat sat on a mat") if teacher.token_bytes(t)]
    nodes = [trie.lookup(p) for p in node_prefixes(teacher, toks)][:6]
    dec_nodes = [dec_trie.lookup(amap.dec(t)[:1]) for t in toks][:3]
    x = logits_for(2, V, seed=11, pad=3, dtype=torch.float64).nan_to_num(0.0).requires_grad_()
    fns = {
        "next_byte": lambda y: ops.next_byte_logprobs(y, teacher),
        "conditional": lambda y: ops.byte_conditional_logprobs(y, teacher, [0, 1, 0, 1, 0, 1][:len(nodes)], nodes),
        "bld targets": lambda y: ops.byte_conditional_logprobs(y, teacher, [1] * len(nodes), nodes, drop_end=True,
                                                               temperature=1.5),
        "project": lambda y: ops.project_to_student(y, amap, temperature=0.8),
        "within": lambda y: ops.project_to_student_within(y, amap, [0, 1, 1][:len(dec_nodes)], dec_nodes),
        "cover": lambda y: ops.cover_logmass(y, amap),
    }
    for backend in ("cpu", "reference"):
        with ops.force_backend(backend):
            for name, fn in fns.items():
                assert torch.autograd.gradcheck(_finite_part(fn, x), (x,), fast_mode=True), f"{backend} {name}"
    idx = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(r))[:40] for r in range(2)])
    lp = torch.log_softmax(x.detach(), -1).gather(1, idx).requires_grad_()
    for name, fn in (("topk project", lambda y: ops.project_to_student(TopK(idx, y), amap, temperature=0.5)),
                     ("topk sparse project",
                      lambda y: ops.project_to_student(TopK(idx, y), amap, temperature=0.5, sparse=True).logprobs),
                     ("topk conditional", lambda y: ops.byte_conditional_logprobs(TopK(idx, y), teacher, [0, 1], nodes[:2]))):
        assert torch.autograd.gradcheck(_finite_part(fn, lp), (lp,), fast_mode=True), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gradients_equal_reference_gradients(small, vocab_of, dtype):
    """The backends' backward (fp32/bf16 kernels) against torch autograd through the reference."""
    teacher = vocab_of("qwen")
    V, trie = len(teacher), teacher.trie
    x = logits_for(11, V, seed=12, dtype=dtype).nan_to_num(0.0)  # a block of eight rows and three single rows
    nodes = [trie.lookup(p) for p in (b" the", b" t", b"in", b"")]
    weights = torch.randn(15, 257, generator=torch.Generator().manual_seed(0))
    grads = []
    for backend in ("cpu", "reference"):
        y = x.clone().requires_grad_()
        with ops.force_backend(backend):
            a = ops.next_byte_logprobs(y, teacher, temperature=1.3)
            b = ops.byte_conditional_logprobs(y, teacher, [0, 2, 2, 1], nodes)
        loss = (a.masked_fill(torch.isinf(a), 0) * weights[:11]).sum() + (b.masked_fill(torch.isinf(b), 0) * weights[11:]).sum()
        loss.backward()
        assert y.grad.dtype == dtype and y.grad.shape == x.shape
        assert (y.grad[:, V:] == 0).all()
        grads.append(y.grad.double())
    scale = grads[1].abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (grads[0] - grads[1]).abs().max().item() <= tol * max(scale, 1.0)


def test_map_op_gradients_equal_reference_gradients(pair, text_tokens):
    teacher, _, amap = pair
    V = len(teacher)
    x = logits_for(9, V, seed=20).nan_to_num(0.0)
    toks = text_tokens(teacher, 6, seed=2)
    consumed = [amap.dec_trie.lookup(amap.dec(t)[:1]) for t in toks]
    grads = []
    for backend in ("cpu", "reference"):
        y = x.clone().requires_grad_()
        with ops.force_backend(backend):
            outs = (ops.project_to_student(y, amap, temperature=0.9), ops.cover_logmass(y[:3], amap),
                    ops.project_to_student_within(y, amap, [0, 8, 8, 1, 2, 3], consumed))
        loss = sum((o.masked_fill(torch.isinf(o), 0) * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs)
        loss.backward()
        grads.append(y.grad.double())
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5 * max(grads[1].abs().max().item(), 1.0)


# ---- dtypes, padding, shapes, temperature, instruction sets --------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(pair, dtype):
    teacher, _, amap = pair
    x = logits_for(3, len(teacher), seed=13, dtype=dtype)
    for op, arg in ((ops.next_byte_logprobs, teacher), (ops.project_to_student, amap), (ops.cover_logmass, amap)):
        out = op(x, arg)
        assert out.dtype == torch.float32
        assert_logs_close(out, reference_of(op, x.float(), arg), what=f"{op.__name__} {dtype}")


def test_leading_dimensions_padding_and_strides(vocab_of):
    vocab = vocab_of("mistral-v1")
    V = len(vocab)
    x = logits_for(6, V, seed=14, pad=100).reshape(2, 3, V + 100)
    out = ops.next_byte_logprobs(x, vocab)
    assert out.shape == (2, 3, 257)
    flat = ops.next_byte_logprobs(x.reshape(6, -1)[:, :V].contiguous(), vocab)
    assert torch.equal(out.reshape(6, 257), flat)
    strided = torch.cat([x.reshape(6, -1), x.reshape(6, -1)], dim=1)[:, : V + 100]  # row stride 2W
    assert torch.equal(ops.next_byte_logprobs(strided, vocab), flat)
    t = x.reshape(6, -1).t().contiguous().t()  # last dim not contiguous
    assert torch.equal(ops.next_byte_logprobs(t, vocab), flat)
    assert ops.next_byte_logprobs(x[:0], vocab).shape == (0, 3, 257)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(pair, temperature):
    teacher, _, amap = pair
    V = len(teacher)
    x = logits_for(2, V, seed=15)
    assert_logs_close(ops.project_to_student(x, amap, temperature=temperature),
                      ops.project_to_student(x[:, :V] / temperature, amap), tol=2e-5, what="project")
    nodes = [teacher.trie.lookup(b" t"), 0]
    assert_logs_close(ops.byte_conditional_logprobs(x, teacher, [0, 1], nodes, temperature=temperature),
                      reference_of(ops.byte_conditional_logprobs, x, teacher, [0, 1], nodes, temperature=temperature),
                      what="conditional")


def test_instruction_sets_and_thread_counts_agree(vocab_of):
    vocab = vocab_of("qwen")
    V = len(vocab)
    x = logits_for(19, V, seed=16)  # two blocks of eight rows and three single rows
    nodes = [vocab.trie.lookup(b" the"), 0]
    results = []
    best = _core.best_kernel_isa()
    isas = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(best) + 1]
    try:
        for isa in isas:
            _cpu_backend.set_kernel_isa(isa)
            for threads in (1, 2):
                _cpu_backend.set_num_threads(threads)
                results.append((ops.next_byte_logprobs(x, vocab), ops.byte_conditional_logprobs(x, vocab, [3, 18], nodes)))
    finally:
        _cpu_backend.set_kernel_isa(None)
        _cpu_backend.set_num_threads(None)
    for a, b in results[1:]:
        assert_logs_close(a, results[0][0], tol=2e-6, what="next_byte")
        assert_logs_close(b, results[0][1], tol=2e-6, what="conditional")


def test_extreme_rows_never_give_nan(vocab_of):
    vocab = vocab_of("llama3")
    V = len(vocab)
    x = torch.zeros(9, V)
    x[:, 1234] = 200.0  # one token holds all the mass in float32
    x[1] = torch.linspace(-300, 300, V)  # a huge range
    x[2] = -1e30  # finite but enormous
    nodes = [vocab.trie.lookup(vocab.token_bytes(1234)[:1]), 0, vocab.trie.lookup(b" t")]
    for op, args in ((ops.next_byte_logprobs, (vocab,)), (ops.byte_conditional_logprobs, (vocab, [0, 1, 2], nodes))):
        out = op(x, *args)
        ref = reference_of(op, x, *args)
        assert not torch.isnan(out).any()
        assert (out.double().exp().sum(-1) - 1).abs().max() < 1e-5
        assert_logs_close(out[(out > -80).all(-1) & (ref > -80).all(-1)], ref[(out > -80).all(-1) & (ref > -80).all(-1)],
                          what=op.__name__)


def test_small_masses_keep_their_precision(vocab_of):
    """Peaky rows: a conditional deep inside a low-probability prefix (the prefix-sum difference would
    cancel) still equals the float64 brute force."""
    vocab = vocab_of("mistral-v1")
    V, trie = len(vocab), vocab.trie
    x = logits_for(1, V, seed=17, scale=1.0, pad=0)
    top = vocab.encode(" the")[0]
    x[0, top] = 40.0  # p(top) ~ 1, everything else ~ e^-40
    prefixes = [b" q", b" qu", b"ing", b" x"]
    nodes = [trie.lookup(p) for p in prefixes]
    out = ops.byte_conditional_logprobs(x, vocab, [0] * 4, nodes)
    masses = bf.byte_masses(bf.softmax64(x[0], V), vocab)
    for q, p in enumerate(prefixes):
        assert_logs_close(out[q], bf.byte_conditional(masses, p), what=repr(p))
    assert_logs_close(ops.next_byte_logprobs(x, vocab)[0], bf.next_byte(bf.softmax64(x[0], V), vocab), what="next byte")


def test_probabilities_below_2_to_the_minus_120_keep_their_precision(pair):
    """One token ~100 nats above the rest: every other output lies near -100, below 2^-120 (-83 nats),
    where a float log of the scaled mass would lose its precision (subnormal floats) and the kernels
    take a double log instead. Rows 0 (an eight-row block) and 8 (a single row), on every instruction
    set, against the float64 brute force."""
    teacher, student, amap = pair
    V = len(teacher)
    x = logits_for(9, V, seed=21, scale=1.0)
    top = next(t for t in teacher.encode(" the") if len(teacher.token_bytes(t)) > 1)
    x[:, top] = 100.0
    prefix = teacher.token_bytes(top)[:1]
    node = teacher.trie.lookup(prefix)
    decs = bf.dec_sequences(amap)
    want = {}
    for r in (0, 8):
        p = bf.softmax64(x[r], V)
        masses = bf.byte_masses(p, teacher)
        want[r] = {"next_byte": bf.next_byte(p, teacher), "cover": bf.cover(masses, student),
                   "project": bf.project_to_student(p, amap, teacher, student, decs),
                   "byte_conditional": bf.byte_conditional(masses, prefix)}
        for name, w in want[r].items():
            w = want[r][name] = torch.as_tensor(np.asarray(w, dtype=np.float64))
            assert int(((w > -120) & (w < -84)).sum()) > 0, f"{name}: no output in the range under test"
    isas = ["scalar", "avx2", "avx512"]
    try:
        for isa in isas[: isas.index(_cpu_backend.kernel_isa()) + 1]:
            _cpu_backend.set_kernel_isa(isa)
            outs = {"next_byte": ops.next_byte_logprobs(x, teacher), "project": ops.project_to_student(x, amap),
                    "cover": ops.cover_logmass(x, amap),
                    "byte_conditional": ops.byte_conditional_logprobs(x, teacher, [0, 8], [node, node])}
            for i, r in enumerate((0, 8)):
                for name, w in want[r].items():
                    assert_logs_close(outs[name][i if name == "byte_conditional" else r], w, what=f"{isa} {name} row {r}")
    finally:
        _cpu_backend.set_kernel_isa(None)


@settings(max_examples=15, deadline=None)
@given(n_rows=st.integers(1, 12), scale=st.floats(0.01, 30.0), temperature=st.floats(0.2, 5.0),
       seed=st.integers(0, 2**16))
def test_property_kernels_equal_reference(n_rows, scale, temperature, seed):
    from conftest import get_test_vocab
    vocab = get_test_vocab("botchan-unigram")
    V = len(vocab)
    x = logits_for(n_rows, V, seed=seed, scale=scale)
    out = ops.next_byte_logprobs(x, vocab, temperature=temperature)
    assert (out.double().exp().sum(-1) - 1).abs().max() < 1e-5
    assert_logs_close(out, reference_of(ops.next_byte_logprobs, x, vocab, temperature=temperature), what="property")


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(pair, map_of):
    teacher, student, amap = pair
    V = len(teacher)
    x = logits_for(2, V, seed=18)
    with pytest.raises(ValueError, match="width"):
        ops.next_byte_logprobs(x[:, : V - 1], teacher)
    with pytest.raises(ValueError, match="teacher vocabulary"):
        ops.project_to_student(x[:, : V - 1], amap)
    with pytest.raises(TypeError, match="dtype"):
        ops.next_byte_logprobs(x.to(torch.int32), teacher)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.next_byte_logprobs(x.numpy(), teacher)
    with pytest.raises(TypeError, match="AlignmentMap"):
        ops.project_to_student(x, teacher)
    for bad in (float("nan"), float("inf"), "row of -inf"):  # -inf entries alone are zero mass (test_neg_inf_logits)
        y = x.clone()
        if bad == "row of -inf":
            y[1] = float("-inf")
        else:
            y[1, 5] = bad
        with pytest.raises(NonFiniteLogitsError, match="row 1 holds NaN or infinite") as err:
            ops.next_byte_logprobs(y, teacher)
        assert err.value.row == 1 and isinstance(err.value, ValueError)
        with pytest.raises(ValueError, match="row 1 holds NaN or infinite"):
            ops.byte_conditional_logprobs(y, teacher, [1], [0])
        with pytest.raises(ValueError, match="row 1 holds NaN or infinite"):
            reference_of(ops.project_to_student, y, amap)
    y = x.clone()
    y[1, 5] = float("nan")
    ops.byte_conditional_logprobs(y, teacher, [0], [0])  # row 1 is not read
    n_nodes = teacher.trie.n_nodes
    with pytest.raises(ValueError, match=r"prefixes\[1\] = .* outside"):
        ops.byte_conditional_logprobs(x, teacher, [0, 1], [0, n_nodes])
    with pytest.raises(ValueError, match=r"rows\[0\] = 2 is outside"):
        ops.byte_conditional_logprobs(x, teacher, [2], [0])
    with pytest.raises(ValueError, match="rows has 2 entries but prefixes has 1"):
        ops.byte_conditional_logprobs(x, teacher, [0, 1], [0])
    with pytest.raises(TypeError, match="integer ids"):
        ops.byte_conditional_logprobs(x, teacher, torch.tensor([0.0]), [0])
    with pytest.raises(ValueError, match="is on meta"):
        ops.byte_conditional_logprobs(x, teacher, torch.zeros(1, dtype=torch.int64, device="meta"), [0])
    with pytest.raises(ValueError, match=r"consumed\[0\] = -1 is outside"):
        ops.project_to_student_within(x, amap, [0], [-1])
    with pytest.raises(ValueError, match="temperature"):
        ops.next_byte_logprobs(x, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ops.cover_logmass(x, amap, temperature=float("nan"))
    with pytest.raises(MapMismatchError, match="teacher"):
        ops.project_to_student(x, amap, teacher=student)
    other = map_of("botchan-bpe", "botchan-unigram")
    if len(teacher) > 1000:
        with pytest.raises(ValueError, match="width"):  # a map for other tokenizers, wider than these logits
            ops.project_to_student(x[:, :900], other)
    # sparse rows, compiled (CPU) and pure torch
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    for backend in (None, "reference"):
        with ops.force_backend(backend):
            for op, args in ((ops.next_byte_logprobs, (teacher,)), (ops.byte_conditional_logprobs, (teacher, [1], [0]))):
                with pytest.raises(ValueError, match="row 1 .*more than once"):
                    op(TopK(torch.tensor([[0, 1, 2], [0, 1, 1]]), lp), *args)
                with pytest.raises(ValueError, match="not a token id"):
                    op(TopK(torch.tensor([[0, 1, 2], [0, 1, V]]), lp), *args)
                with pytest.raises(ValueError, match="row 1 holds NaN"):
                    op(TopK(idx, torch.tensor([[-1.0, -2.0, -3.0], [-1.0, float("nan"), -3.0]])), *args)
                with pytest.raises(ValueError, match="same shape"):
                    op(TopK(idx, lp[:, :2]), *args)
                with pytest.raises(TypeError, match="int64 or int32"):
                    op(TopK(idx.float(), lp), *args)


def test_compiled_and_torch_child_ranges_agree(pair):
    """The node -> range-query tables: compiled for CPU ids, torch ops elsewhere (CUDA)."""
    teacher, _, amap = pair
    for trie, n_sym in ((ops._byte_trie(teacher), 256), (ops._map_tables(amap)[2], len(amap.cover_lo))):
        nodes = torch.cat([torch.tensor([0]), torch.randint(0, trie.n_nodes, (50,), generator=torch.Generator().manual_seed(0))])
        a = ops._child_ranges(trie, nodes, n_sym + 1)
        b = ops._child_ranges(trie, nodes, n_sym + 1, compiled=False)
        assert a[3] == b[3] and all(torch.equal(u.long(), w.long()) for u, w in zip(a[:3], b[:3]))



def test_trie_conditional_kernel_rejects_inconsistent_tables(small):
    """The compiled trie-conditional kernel checks what it indexes: rows, nodes, order ids, child
    ranges that must tile their parent's, child symbols below the output width."""
    teacher, _, amap = small
    dec = ops._map_tables(amap)[2]
    order = dec.on("cpu")["order"].numpy().astype(np.int32)
    nodes_np = [a.copy() for a in dec.nodes_np]
    x = logits_for(2, len(teacher), seed=31).nan_to_num(0.0).numpy()
    width = dec.n_symbols + 1

    def call(order=order, trie=tuple(nodes_np), rows=np.array([0, 1]), nodes=np.array([0, 0]), width=width):
        return _core.trie_conditional_logprobs(x, "f32", len(teacher), order, trie, rows, nodes, width, False, 1.0, 1)

    out, lse = call()
    assert out.shape == (2, width) and np.isfinite(lse).all()
    with pytest.raises(ValueError, match=r"rows\[1\] = 5 is outside"):
        call(rows=np.array([0, 5]))
    with pytest.raises(ValueError, match=r"nodes\[0\] = -1 is outside"):
        call(nodes=np.array([-1, 0]))
    bad_order = order.copy()
    bad_order[3] = len(teacher) + 7
    with pytest.raises(ValueError, match=r"order\[3\] = .* outside the vocabulary"):
        call(order=bad_order)
    with pytest.raises(ValueError, match="child symbol .* outside"):
        call(width=2)
    cs, cn, lo, hi, end, sym = [a.copy() for a in nodes_np]
    first_child = cn[cs[0]]
    lo[first_child] += 1  # its range no longer starts where its parent's continuing range does
    with pytest.raises(ValueError, match="do not tile"):
        call(trie=(cs, cn, lo, hi, end, sym))
    with pytest.raises(ValueError, match="rows has 1 entries but nodes has 2"):
        call(rows=np.array([0]))

def test_backend_reports_and_forcing(vocab_of):
    vocab = vocab_of("botchan-bpe")
    x = logits_for(2, len(vocab), seed=19)
    ops.next_byte_logprobs(x, vocab)
    assert ops.last_backend() == "cpu"
    with ops.force_backend("reference"):
        ops.next_byte_logprobs(x, vocab)
        assert ops.last_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.force_backend("tpu"):
            pass
    assert math.isclose(_cpu_backend.num_threads(), torch.get_num_threads())
