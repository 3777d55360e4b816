"""Fused (hidden states + output layer, ``ctalign.losses.fused``) against unfused (full logits) loss
steps: peak memory beyond the model and time per step (forward + backward), on CPU, one thread.

    python benchmarks/test_bench_fused.py                 # the table (heads x positions, then the losses)
    python benchmarks/test_bench_fused.py --quick         # small shapes only
    pytest benchmarks/test_bench_fused.py --benchmark-only

Memory: each (case, mode) runs in a fresh subprocess; "beyond the model" is the peak RSS of one step
minus the RSS with the inputs (hidden states, output layer, teacher rows) allocated: the logits,
their gradient, the loss's intermediates and the gradients of hidden and weight. Time: the median of
the following warm steps. Ratios are within one run (the machine may be shared).

Shapes: ``CTALIGN_FUSED_BENCH_HEADS`` (``VxH,...``, default ``49152x576,128256x576``: the SmolLM2-135M
head and a 128k vocabulary at the same width), ``CTALIGN_FUSED_BENCH_POSITIONS`` (default
``4096,16384``). The loss table: teacher llama3 -> student mistral-v1 (the collator over botchan
slices, 4 texts x 256 teacher tokens), dense teacher logits, each loss unfused and fused against a
plain torch KL + cross-entropy over the same student logits.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if any((_ROOT / "python" / "ctalign").glob("_core*.so")) and str(_ROOT / "python") not in sys.path:
    sys.path.insert(0, str(_ROOT / "python"))

HEADS = [tuple(int(v) for v in s.split("x")) for s in
         os.environ.get("CTALIGN_FUSED_BENCH_HEADS", "49152x576,128256x576").split(",")]
POSITIONS = [int(s) for s in os.environ.get("CTALIGN_FUSED_BENCH_POSITIONS", "4096,16384").split(",")]
LOSSES = ("plain_kl_ce", "ce", "likelihood", "bpm", "escd", "strict_kd", "uld_top256", "bld_token_ce")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the head x positions cases (plain CE: the head's cost, the same for every loss) ----------------
def ce_inputs(n: int, V: int, H: int, seq: int = 1024):
    import torch
    g = torch.Generator().manual_seed(0)
    B = max(1, n // seq)
    hidden = (torch.randn(B, n // B, H, generator=g)).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_()
    ids = torch.randint(0, V, (B, n // B), generator=g)
    return hidden, weight, ids


def ce_step(mode: str, hidden, weight, ids):
    from ctalign import losses as L
    hidden.grad = weight.grad = None
    if mode == "fused":
        loss = L.cross_entropy_from_hidden(hidden, weight, ids)
    else:
        loss = L.cross_entropy(hidden @ weight.T, ids)
    loss.backward()
    return float(loss.detach())


def run_one_ce(mode: str, n: int, V: int, H: int, reps: int) -> dict:
    import torch
    torch.set_num_threads(1)
    ce_step(mode, *ce_inputs(64, 512, 8))  # imports and kernel set-up, outside the measured step
    hidden, weight, ids = ce_inputs(n, V, H)
    base = _rss_bytes()
    t0 = time.perf_counter()
    ce_step(mode, hidden, weight, ids)
    first = time.perf_counter() - t0
    peak = _peak_bytes() - base
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ce_step(mode, hidden, weight, ids)
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "positions": n, "V": V, "H": H, "peak_extra_bytes": peak,
            "seconds": statistics.median(times) if times else first, "first_seconds": first}


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the loss cases (real pair, every loss) ---------------------------------------------------------
def loss_case(n_texts: int = 4, n_tokens: int = 256, H: int = 576):
    import torch
    from ctalign import assets, build_map, load_vocab
    from ctalign.data import DistillationCollator
    t, s = (load_vocab(assets.path(n), name=n) for n in ("llama3", "mistral-v1"))
    amap = build_map(t, s)
    text = assets.path("botchan-text").read_text(encoding="utf-8")
    base = t.encode(text[:200000])
    texts = [t.decode_bytes(base[3000 + 911 * i: 3000 + 911 * i + n_tokens - 2]).decode("utf-8", errors="ignore")
             for i in range(n_texts)]
    b = DistillationCollator(amap, byte_queries=10)(texts)
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(*b["teacher_input_ids"].shape, amap.n_teacher, generator=g) * 3
    hidden = torch.randn(*b["student_input_ids"].shape, H, generator=g).requires_grad_()
    weight = (torch.randn(amap.n_student, H, generator=g) * H ** -0.5).requires_grad_()
    target = torch.log_softmax(torch.randn(*b["student_input_ids"].shape, amap.n_student, generator=g) * 3, -1)
    return amap, b, tl, hidden, weight, target


def loss_step(name: str, mode: str, amap, b, tl, hidden, weight, target):
    import torch
    import torch.nn.functional as F
    from ctalign import losses as L
    ids, a, sm, tm = b["student_input_ids"], b["alignment"], b["student_loss_mask"], b["teacher_loss_mask"]
    hidden.grad = weight.grad = None
    fused = mode == "fused"
    x = None if fused else hidden @ weight.T
    if name == "plain_kl_ce":  # plain torch: KL(target || student) + CE over the same student logits
        x = hidden @ weight.T
        lp = torch.log_softmax(x, -1)
        loss = F.kl_div(lp[:, :-1].reshape(-1, x.shape[-1]), target[:, 1:].reshape(-1, x.shape[-1]), log_target=True,
                        reduction="batchmean") + F.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), ids[:, 1:].reshape(-1))
    elif name == "ce":
        loss = (L.cross_entropy_from_hidden(hidden, weight, ids, mask=sm) if fused else
                L.cross_entropy(x, ids, mask=sm))
    elif name == "likelihood":
        loss = (L.likelihood_loss_from_hidden(hidden, weight, tl, ids, a, amap, student_mask=sm) if fused else
                L.likelihood_distillation_loss(x, tl, ids, a, amap, student_mask=sm))
    elif name == "bpm":
        loss = (L.bpm_loss_from_hidden(hidden, weight, tl, ids, a, amap, student_mask=sm, ce_weight=0.2) if fused else
                L.bpm_loss(x, tl, ids, a, amap, student_mask=sm, ce_weight=0.2))
    elif name == "escd":
        loss = (L.escd_loss_from_hidden(hidden, weight, tl, ids, a, amap, student_mask=sm, ce_weight=0.2) if fused
                else L.escd_loss(x, tl, ids, a, amap, student_mask=sm, ce_weight=0.2))
    elif name == "strict_kd":
        loss = (L.strict_kd_loss_from_hidden(hidden, weight, tl, ids, a, amap, student_mask=sm, ce_weight=0.2)
                if fused else L.strict_kd_loss(x, tl, ids, a, amap, student_mask=sm, ce_weight=0.2))
    elif name == "uld_top256":
        kw = dict(alignment=a, student_mask=sm, teacher_mask=tm, align="byte", top_k=256,
                  student_vocab_size=amap.n_student, teacher_vocab_size=amap.n_teacher)
        loss = (L.uld_loss_from_hidden(hidden, weight, tl, ids, **kw) if fused else L.uld_loss(x, tl, ids, **kw))
    elif name == "bld_token_ce":  # BLD's token CE (its byte head terms are the same small head either way)
        loss = (L.cross_entropy_from_hidden(hidden, weight, ids, mask=sm, vocab_size=len(amap.student)) if fused
                else L.cross_entropy(x, ids, mask=sm, vocab_size=len(amap.student)))
    else:
        raise KeyError(name)
    loss.backward()
    return float(loss.detach())


def run_losses(reps: int = 5) -> list[dict]:
    """Median seconds per step of every (loss, mode), the steps taken round-robin (one step of each, then
    the next round) so that a change of the machine's load falls on every loss alike."""
    import torch
    torch.set_num_threads(1)
    case = loss_case()
    cases = [(name, mode) for name in LOSSES for mode in (("unfused",) if name == "plain_kl_ce" else ("unfused", "fused"))]
    times = {c: [] for c in cases}
    for rnd in range(reps + 1):  # round 0 warms up
        for name, mode in cases:
            t0 = time.perf_counter()
            loss_step(name, mode, *case)
            if rnd:
                times[(name, mode)].append(time.perf_counter() - t0)
    return [{"loss": name, "mode": mode, "seconds": statistics.median(times[(name, mode)]),
             "runs": [round(t, 4) for t in times[(name, mode)]]} for name, mode in cases]


# ---- pytest-benchmark ---------------------------------------------------------------------------------
def _bench_ids():
    return [f"{n}x{V}x{H}" for n in POSITIONS[:1] for V, H in HEADS[:1]]


try:
    import pytest

    @pytest.mark.parametrize("mode", ["unfused", "fused"])
    def test_bench_fused_ce_step(benchmark, mode):
        import torch
        pytest.importorskip("pytest_benchmark")
        torch.set_num_threads(1)
        V, H = HEADS[0]
        inputs = ce_inputs(POSITIONS[0], V, H)
        benchmark.extra_info.update({"positions": POSITIONS[0], "V": V, "H": H})
        benchmark.pedantic(ce_step, args=(mode, *inputs), rounds=3, iterations=1, warmup_rounds=1)

    @pytest.mark.parametrize("mode", ["unfused", "fused"])
    @pytest.mark.parametrize("name", LOSSES)
    def test_bench_fused_loss_step(benchmark, name, mode):
        import torch
        pytest.importorskip("pytest_benchmark")
        if name == "plain_kl_ce" and mode == "fused":
            pytest.skip("the plain torch baseline has no fused form")
        torch.set_num_threads(1)
        case = _cached_loss_case()
        benchmark.pedantic(loss_step, args=(name, mode, *case), rounds=3, iterations=1, warmup_rounds=1)

    _CASE = {}

    def _cached_loss_case():
        if "c" not in _CASE:
            _CASE["c"] = loss_case()
        return _CASE["c"]
except ImportError:  # pragma: no cover
    pass


def _mib(b):
    return f"{b / 2 ** 20:,.0f}"


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--one":
        mode, n, V, H, reps = argv[1], *(int(x) for x in argv[2:6])
        print(json.dumps(run_one_ce(mode, n, V, H, reps)))
        return
    if argv and argv[0] == "--losses":
        print(json.dumps(run_losses()))
        return
    quick = "--quick" in argv
    heads = [(V, H) for V, H in HEADS] if not quick else [(49152, 576)]
    positions = POSITIONS if not quick else [1024]
    budget = float(os.environ.get("CTALIGN_FUSED_BENCH_GIB", "14")) * 2 ** 30
    print("peak MiB: beyond the inputs, including the weight's gradient (V x H float32, both modes); "
          "'saved': beyond the model and its gradients")
    print("| positions | head V x H | unfused peak MiB | fused peak MiB | memory saved | unfused s/step | "
          "fused s/step | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for n in positions:
        for V, H in heads:
            res = {}
            for mode in ("unfused", "fused"):
                if mode == "unfused" and 4 * n * V * 3 > budget:
                    res[mode] = {"error": f"not run: ~{4 * n * V * 3 / 2 ** 30:.0f} GiB of logits, gradient and "
                                          f"log-softmax over the {budget / 2 ** 30:.0f} GiB budget"}
                    continue
                res[mode] = _subprocess(["--one", mode, str(n), str(V), str(H), "1"])
            u, f = res["unfused"], res["fused"]
            if "error" in u or "error" in f:
                print(f"| {n} | {V} x {H} | {u.get('error') or _mib(u['peak_extra_bytes'])} | "
                      f"{f.get('error') or _mib(f['peak_extra_bytes'])} | | {u.get('seconds', '')} | "
                      f"{f.get('seconds', '')} | |")
                continue
            print(f"| {n} | {V} x {H} | {_mib(u['peak_extra_bytes'])} | {_mib(f['peak_extra_bytes'])} | "
                  f"{1 - (f['peak_extra_bytes'] - 4 * V * H) / (u['peak_extra_bytes'] - 4 * V * H):.0%} | "
                  f"{u['seconds']:.2f} | "
                  f"{f['seconds']:.2f} | {f['seconds'] / u['seconds']:.2f}x |", flush=True)
    if quick or "--no-losses" in argv:
        return
    rows = _subprocess(["--losses"])
    if isinstance(rows, dict):
        print("losses:", rows.get("error"))
        return
    base = next(r["seconds"] for r in rows if r["loss"] == "plain_kl_ce")
    print("\n| loss (llama3 -> mistral-v1, 4 x 256 teacher tokens, H 576) | unfused s | vs plain KL+CE | "
          "fused s | vs plain KL+CE |")
    print("|---|---|---|---|---|")
    by = {(r["loss"], r["mode"]): r["seconds"] for r in rows}
    for name in LOSSES:
        u, f = by.get((name, "unfused")), by.get((name, "fused"))
        print(f"| {name} | {u:.3f} | {u / base:.2f}x | " + (f"{f:.3f} | {f / base:.2f}x |" if f else "- | - |"))


if __name__ == "__main__":
    main(sys.argv[1:])
