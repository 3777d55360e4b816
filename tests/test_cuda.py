"""CUDA kernels (ctalign._cuda via ctalign.ops._cuda_backend) against the float64 pure-torch reference
and the CPU kernels, on real tokenizers.

Tests marked ``cuda`` need a CUDA GPU and the built module; they are skipped elsewhere. The first
tests run everywhere: the backend imports (with or without ``_cuda``) and reports itself unavailable
without a GPU.

Accuracy is measured in log space against ``ctalign.reference`` run in float64 on the same
(upcast) logits: outputs whose reference is above ``SIGNIFICANT`` (a mass of ~1e-26 of the row)
must agree within ``TOL``; zero mass must give exactly -inf; nothing may be NaN. Each test prints
its maximum error (run with ``-s`` to see them).
"""
from __future__ import annotations

import math

import pytest
import torch

from ctalign.ops import _cuda_backend as cb
from ctalign import ops, reference

TOL = 1e-5          # log-space absolute error allowed (fp32, bf16 and fp16 inputs alike)
SIGNIFICANT = -60.0  # outputs below this may flush to zero (fp32 exp underflow)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

gpu = pytest.mark.skipif(not cb.available(), reason="needs a CUDA GPU and the ctalign._cuda module")


# ---- runs everywhere ----------------------------------------------------------------------------
def test_backend_imports_and_reports_availability():
    assert isinstance(cb.available(), bool)
    if not torch.cuda.is_available():
        assert cb.available() is False
    if cb._cuda is not None:
        n = cb._cuda.device_count()
        assert isinstance(n, int) and n >= 0
        limits = cb._cuda.cluster_limits(0)
        assert len(limits) == 2
        if n == 0:
            assert tuple(limits) == (0, 0)


def test_backend_rejects_cpu_tensors():
    x = torch.zeros(2, 8)
    group = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cb.grouped_logmass(x, 8, group, 1, 1.0)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cb.range_logmass(x, 8, torch.arange(8, dtype=torch.int32), None, torch.zeros(1, 1, dtype=torch.int32),
                         torch.ones(1, 1, dtype=torch.int32), 1.0)


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev():
    return torch.device("cuda")


@pytest.fixture(scope="module")
def vocabs(load_test_vocab):
    return {name: load_test_vocab(name) for name in ("qwen", "llama3", "mistral-v1")}


@pytest.fixture(scope="module")
def maps(vocabs):
    from ctalign import build_map
    return {
        "qwen>mistral-v1": build_map(vocabs["qwen"], vocabs["mistral-v1"]),
        "llama3>qwen": build_map(vocabs["llama3"], vocabs["qwen"]),
    }


def logits_for(n_rows, vocab, dtype, dev, layout="aligned", seed=0, extreme=True):
    """Random LM-like logits [n_rows, W >= vocab] in the given memory layout: ``aligned`` (width a
    multiple of 16), ``odd`` (width vocab + 19: rows not 16-byte aligned) or ``offset`` (a view
    starting one column in: base pointer not aligned). ``extreme`` adds rows whose maximum moves
    along the row (a ramp over +-700), a +5000 offset and one token holding nearly all mass."""
    g = torch.Generator(device=dev).manual_seed(seed)
    width = vocab + 19 if layout == "odd" else (vocab + 15) // 16 * 16 + (16 if layout == "offset" else 0)
    x = torch.randn(n_rows, width, generator=g, device=dev) * 3.0
    x[:, ::53] += 8.0
    if extreme and n_rows > 3:
        x[1] = torch.linspace(-700.0, 700.0, width, device=dev)       # the max moves all along the row
        x[2] = x[2] + 5000.0                                           # a large offset
        x[3, :] = -3.0
        x[3, vocab // 3] = 40.0                                        # one token holds ~all mass
    x = x.to(dtype)
    if layout == "offset":
        x = x[:, 1:]
    return x


def check_log(got, ref, what, tol=TOL, exact_zero=True):
    """Max |got - ref| over significant outputs; asserts the -inf / NaN rules and the tolerance.
    ``exact_zero``: ref is the float64 reference, so its -inf is an exact zero mass; against another
    fp32 kernel, a -inf on either side only needs a tiny mass on the other."""
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert got.shape == ref.shape, what
    assert not torch.isnan(got).any(), f"{what}: NaN in the output"
    zero = ref == -math.inf
    if exact_zero:
        assert (got[zero] == -math.inf).all(), f"{what}: zero mass must give -inf"
    else:
        assert (got[zero] < SIGNIFICANT).all() and (ref[got == -math.inf] < SIGNIFICANT).all(), what
    sig = ref > SIGNIFICANT
    err = float((got[sig] - ref[sig]).abs().max()) if sig.any() else 0.0
    tail = ~sig & ~zero
    if tail.any():
        assert (got[tail] < SIGNIFICANT + 10).all(), f"{what}: a tiny mass came out large"
    small = sig & (ref < math.log(1e-6))
    err_small = float((got[small] - ref[small]).abs().max()) if small.any() else 0.0
    print(f"\n[cuda-accuracy] {what}: max abs log error {err:.3g} (masses < 1e-6: {err_small:.3g}), "
          f"{int(sig.sum())} outputs")
    assert err <= tol, f"{what}: max abs log error {err:.3g} > {tol}"
    return err


def ref_grouped(x, v, group, g, t):
    return reference.grouped_logmass(x.double(), v, group, g, t)


def ref_range(x, v, order, rows, lo, hi, t):
    return reference.range_logmass(x.double(), v, order, rows, lo, hi, t)


def first_byte_group(vocab, dev):
    return ops._byte_trie(vocab).on(dev)["group"]


# ---- grouped log mass -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["aligned", "odd", "offset"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["qwen", "llama3"])
@pytest.mark.cuda
@gpu
def test_grouped_next_byte_matches_reference(vocabs, dev, name, dtype, layout):
    vocab = vocabs[name]
    v = len(vocab)
    group = first_byte_group(vocab, dev)
    x = logits_for(48, v, dtype, dev, layout)
    for t in (1.0, 0.7):
        out, lse = cb.grouped_logmass(x, v, group, 257, t)
        assert cb.last_kernel.startswith("grouped")
        ref_out, ref_lse = ref_grouped(x, v, group, 257, t)
        check_log(out, ref_out, f"next_byte {name} {dtype} {layout} T={t}")
        check_log(lse, ref_lse, f"next_byte lse {name} {dtype} {layout} T={t}", tol=1e-5 * max(1.0, float(ref_lse.abs().max()) / 100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@gpu
def test_grouped_kernel_variants_agree(vocabs, dev, dtype, monkeypatch):
    vocab = vocabs["qwen"]
    v = len(vocab)
    group = first_byte_group(vocab, dev)
    x = logits_for(37, v, dtype, dev)  # 37 rows: partial last block for 2 and 4 rows per block
    ref_out, _ = ref_grouped(x, v, group, 257, 1.0)
    for variant in (11, 21, 41, 20, 40):
        monkeypatch.setitem(cb.options, "grouped_variant", variant)
        out, _ = cb.grouped_logmass(x, v, group, 257, 1.0)
        check_log(out, ref_out, f"next_byte variant {variant} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@gpu
def test_grouped_next_byte_through_cluster_kernel(vocabs, dev, dtype, monkeypatch):
    vocab = vocabs["qwen"]
    v = len(vocab)
    group = first_byte_group(vocab, dev)
    x = logits_for(33, v, dtype, dev)
    monkeypatch.setitem(cb.options, "grouped_path", "cluster")
    out, lse = cb.grouped_logmass(x, v, group, 257, 1.0)
    ref_out, ref_lse = ref_grouped(x, v, group, 257, 1.0)
    check_log(out, ref_out, f"next_byte via cluster {dtype} [{cb.last_kernel}]")
    assert torch.allclose(lse.double().cpu(), ref_lse.cpu(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("path", ["cluster", "bins"])
@pytest.mark.parametrize("pair", ["qwen>mistral-v1", "llama3>qwen"])
@pytest.mark.cuda
@gpu
def test_grouped_project_to_student(maps, dev, pair, path, monkeypatch):
    mt, _bt, _dec = ops._map_tables(maps[pair])
    v, g = mt.n_teacher, mt.n_student + 1
    group = mt.on(dev)["group"]
    monkeypatch.setitem(cb.options, "grouped_path", path)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits_for(24, v, dtype, dev, "odd" if dtype == torch.bfloat16 else "aligned")
        out, lse = cb.grouped_logmass(x, v, group, g, 1.0)
        ref_out, ref_lse = ref_grouped(x, v, group, g, 1.0)
        # the chunked block bins (not the default below 65,536 groups) measured 1.1e-5 at G = 32,001
        tol = 2e-5 if cb.last_kernel == "grouped-chunked" else TOL
        check_log(out, ref_out, f"project {pair} {path} {dtype} [{cb.last_kernel}]", tol=tol)
        assert torch.allclose(lse.double().cpu(), ref_lse.cpu(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", ["next_byte", "project"])
@pytest.mark.cuda
@gpu
def test_grouped_backward_matches_autograd(vocabs, maps, dev, groups, dtype):
    if groups == "next_byte":
        vocab = vocabs["qwen"]
        v, g, group = len(vocab), 257, first_byte_group(vocab, dev)
    else:
        mt, _bt, _dec = ops._map_tables(maps["qwen>mistral-v1"])
        v, g, group = mt.n_teacher, mt.n_student + 1, mt.on(dev)["group"]
    x = logits_for(16, v, dtype, dev, "odd", extreme=False)  # float64 autograd gives NaN on denormal masses
    t = 0.8
    out, lse = cb.grouped_logmass(x, v, group, g, t)
    gen = torch.Generator(device=dev).manual_seed(3)
    grad_out = torch.randn(out.shape, generator=gen, device=dev)
    got = cb.grouped_logmass_backward(x, v, group, g, t, out, lse, grad_out)
    x64 = x.double().requires_grad_(True)
    ref_out, _ = reference.grouped_logmass(x64, v, group, g, t)
    gmask = torch.where(ref_out > -math.inf, grad_out.double(), torch.zeros_like(ref_out))
    (ref_out.masked_fill(ref_out == -math.inf, 0.0) * gmask).sum().backward()
    ref = x64.grad
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (got[:, v:] == 0).all()
    scale = float(ref.abs().max())
    err = float((got.double() - ref).abs().max())
    print(f"\n[cuda-accuracy] grouped backward {groups} {dtype}: max abs error {err:.3g} (max |grad| {scale:.3g})")
    assert err <= 1e-5 * scale + 1e-7


# ---- range log mass -------------------------------------------------------------------------------
def conditional_queries(vocab, dev, n_rows, n_queries, seed=0):
    """Random (row, trie node) queries with their child ranges, as the byte conditionals ask them."""
    tab = ops._byte_trie(vocab)
    gen = torch.Generator().manual_seed(seed)
    nodes = torch.randint(0, tab.n_nodes, (n_queries,), generator=gen)
    nodes[:4] = torch.tensor([0, 1, 2, 3])  # the root (whole vocabulary) and first-level nodes
    rows = torch.randint(0, n_rows - 1, (n_queries,), generator=gen)  # the last row is never asked
    lo, hi, _sym, _k = ops._child_ranges(tab.on(dev), nodes.to(dev), 257)
    return rows.to(dev), lo, hi, tab.on(dev)["order"]


@pytest.mark.parametrize("path", ["cluster", "direct"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.cuda
@gpu
def test_range_conditional_queries(vocabs, dev, dtype, path, monkeypatch):
    vocab = vocabs["qwen"]
    v = len(vocab)
    x = logits_for(40, v, dtype, dev, "odd" if dtype == torch.float16 else "aligned")
    rows, lo, hi, order = conditional_queries(vocab, dev, 40, 300)
    monkeypatch.setitem(cb.options, "range", path)
    out, lse = cb.range_logmass(x, v, order, rows, lo, hi, 0.9)
    ref_out, ref_lse = ref_range(x, v, order, rows, lo, hi, 0.9)
    check_log(out, ref_out, f"range queries {dtype} {path} [{cb.last_kernel}]")
    assert torch.allclose(lse.double().cpu(), ref_lse.cpu(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("path", ["cluster", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@gpu
def test_range_cover_shared(maps, dev, dtype, path, monkeypatch):
    mt, bt, _dec = ops._map_tables(maps["qwen>mistral-v1"])
    v = mt.n_teacher
    tab = mt.on(dev)
    order = bt.on(dev)["order"]
    x = logits_for(12, v, dtype, dev)
    monkeypatch.setitem(cb.options, "range", path)
    out, _ = cb.range_logmass(x, v, order, None, tab["cover_lo"], tab["cover_hi"], 1.0)
    ref_out, _ = ref_range(x, v, order, None, tab["cover_lo"], tab["cover_hi"], 1.0)
    check_log(out, ref_out, f"cover qwen>mistral {dtype} {path} [{cb.last_kernel}]")


@pytest.mark.cuda
@gpu
def test_range_cluster_sizes_agree(vocabs, dev, monkeypatch):
    vocab = vocabs["llama3"]
    v = len(vocab)
    x = logits_for(20, v, torch.float32, dev)
    rows, lo, hi, order = conditional_queries(vocab, dev, 20, 120, seed=5)
    ref_out, _ = ref_range(x, v, order, rows, lo, hi, 1.0)
    monkeypatch.setitem(cb.options, "range", "cluster")
    for size in (0, 5, 8):
        monkeypatch.setitem(cb.options, "cluster_min", size)
        out, _ = cb.range_logmass(x, v, order, rows, lo, hi, 1.0)
        check_log(out, ref_out, f"range cluster_min={size} [{cb.last_kernel}]")


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.cuda
@gpu
def test_range_backward_matches_autograd(vocabs, maps, dev, shared):
    if shared:
        mt, bt, _dec = ops._map_tables(maps["qwen>mistral-v1"])
        v = mt.n_teacher
        order = bt.on(dev)["order"]
        lo, hi, rows = mt.on(dev)["cover_lo"], mt.on(dev)["cover_hi"], None
        n = 6
    else:
        vocab = vocabs["qwen"]
        v, n = len(vocab), 10
        rows, lo, hi, order = conditional_queries(vocab, dev, n, 40, seed=2)
    x = logits_for(n, v, torch.float32, dev, "odd", extreme=False)
    t = 1.3
    out, lse = cb.range_logmass(x, v, order, rows, lo, hi, t)
    gen = torch.Generator(device=dev).manual_seed(4)
    grad_out = torch.randn(out.shape, generator=gen, device=dev)
    got = cb.range_logmass_backward(x, v, order, rows, lo, hi, t, out, lse, grad_out)
    x64 = x.double().requires_grad_(True)
    ref_out, _ = reference.range_logmass(x64, v, order, rows, lo, hi, t)
    finite = ref_out > -math.inf
    (torch.where(finite, ref_out, torch.zeros_like(ref_out)) * torch.where(finite, grad_out.double(), 0.0)).sum().backward()
    ref = x64.grad
    assert (got[:, v:] == 0).all()
    scale = float(ref.abs().max())
    err = float((got.double() - ref).abs().max())
    print(f"\n[cuda-accuracy] range backward shared={shared}: max abs error {err:.3g} (max |grad| {scale:.3g})")
    assert err <= 1e-5 * scale + 1e-7


# ---- through ctalign.ops, against the CPU kernels -------------------------------------------------
@pytest.mark.cuda
@gpu
def test_ops_on_cuda_equal_cpu_kernels(vocabs, maps, dev):
    vocab = vocabs["qwen"]
    amap = maps["qwen>mistral-v1"]
    x = logits_for(8, len(vocab), torch.float32, dev, "odd")
    xc = x.cpu()
    cases = [
        ("next_byte_logprobs", lambda z: ops.next_byte_logprobs(z, vocab)),
        ("project_to_student", lambda z: ops.project_to_student(z, amap)),
        ("cover_logmass", lambda z: ops.cover_logmass(z, amap)),
        ("byte_conditional_logprobs",
         lambda z: ops.byte_conditional_logprobs(z, vocab, [0, 3, 5, 5], [0, 1, 2, vocab.trie.lookup(b" the")])),
    ]
    for name, fn in cases:
        got = fn(x)
        assert ops.last_backend() == "cuda", name
        want = fn(xc)
        assert ops.last_backend() == "cpu", name
        check_log(got, want, f"ops.{name} cuda vs cpu kernels", exact_zero=False)


@pytest.mark.cuda
@gpu
def test_nonfinite_rows_give_nonfinite_lse(vocabs, dev):
    vocab = vocabs["llama3"]
    v = len(vocab)
    group = first_byte_group(vocab, dev)
    x = logits_for(6, v, torch.float32, dev)
    x[4, 100] = float("nan")
    x[5, 7] = float("inf")
    _, lse = cb.grouped_logmass(x, v, group, 257, 1.0)
    assert torch.isfinite(lse[:4]).all() and not torch.isfinite(lse[4:]).any()
    order = ops._byte_trie(vocab).on(dev)["order"]
    lo = torch.zeros(1, 1, dtype=torch.int32, device=dev)
    hi = torch.full((1, 1), order.numel(), dtype=torch.int32, device=dev)
    _, lse = cb.range_logmass(x, v, order, None, lo, hi, 1.0)
    assert torch.isfinite(lse[:4]).all() and not torch.isfinite(lse[4:]).any()


@pytest.mark.cuda
@gpu
def test_runs_on_current_stream_without_host_sync(vocabs, maps, dev):
    vocab = vocabs["qwen"]
    v = len(vocab)
    group = first_byte_group(vocab, dev)
    rows, lo, hi, order = conditional_queries(vocab, dev, 16, 50)
    mt, bt, _dec = ops._map_tables(maps["llama3>qwen"])
    x = logits_for(16, v, torch.bfloat16, dev)
    xt = logits_for(16, mt.n_teacher, torch.bfloat16, dev)
    g_big = mt.on(dev)["group"]
    # warm the caches (a cluster plan checks its order once, with a synchronisation)
    cb.grouped_logmass(x, v, group, 257, 1.0)
    cb.range_logmass(x, v, order, rows, lo, hi, 1.0)
    cb.grouped_logmass(xt, mt.n_teacher, g_big, mt.n_student + 1, 1.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            out, lse = cb.grouped_logmass(x, v, group, 257, 1.0)
            grad = cb.grouped_logmass_backward(x, v, group, 257, 1.0, out, lse, torch.ones_like(out))
            rout, _ = cb.range_logmass(x, v, order, rows, lo, hi, 1.0)
            pout, _ = cb.grouped_logmass(xt, mt.n_teacher, g_big, mt.n_student + 1, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    check_log(out, ref_grouped(x, v, group, 257, 1.0)[0], "side stream grouped")
    check_log(rout, ref_range(x, v, order, rows, lo, hi, 1.0)[0], "side stream range")
    check_log(pout, ref_grouped(xt, mt.n_teacher, g_big, mt.n_student + 1, 1.0)[0], "side stream project")
    assert torch.isfinite(grad).all()
