"""The offline teacher cache (ctalign.cache) on real tokenizers: the row encoding's stated error, exact
resumption after SIGKILL, several ranks, DataLoader workers, bad caches, and every loss trained from
cached rows against the same loss on the live teacher's rows.

The teacher is a deterministic function of the token ids (an embedding and an output matrix, seeded),
so a run can be repeated byte for byte; its vocabulary is a real tokenizer's (Llama-3's 128k ids need
3-byte ids, Mistral's 32k 2-byte ids).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ctalign import cache, ops
from ctalign.cache import CacheError, RowCodec, TeacherCache
from ctalign.cache.codec import id_bytes_for

ROOT = Path(__file__).resolve().parents[1]


class LinearTeacher:
    """logits[b, j] = E[ids[b, j]] @ W + the position's phase: deterministic, batch independent."""

    def __init__(self, vocab_size: int, width: int | None = None, seed: int = 0, scale: float = 0.8):
        g = torch.Generator().manual_seed(seed)
        width = width or vocab_size + 5  # a padded output layer
        self.E = torch.randn(vocab_size, 12, generator=g)
        self.W = torch.randn(12, width, generator=g) * scale
        self.P = torch.randn(4096, 12, generator=g) * 0.3
        self.calls = 0

    def __call__(self, ids, attention_mask):
        self.calls += 1
        L = ids.shape[1]
        return (self.E[ids] + self.P[:L]) @ self.W


def texts(botchan_text: str, n: int, lines_per: int = 3) -> list[str]:
    lines = [line for line in botchan_text.splitlines() if line.strip()]
    return ["\n".join(lines[i * lines_per:(i + 1) * lines_per]) for i in range(n)]


@pytest.fixture(scope="module")
def llama(load_test_vocab):
    return load_test_vocab("llama3")


@pytest.fixture(scope="module")
def mistral(load_test_vocab):
    return load_test_vocab("mistral-v1")


# ---- the row encoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("codec_name", ["q8", "q16", "f16", "f32"])
@pytest.mark.parametrize("vocab_name", ["llama3", "mistral-v1"])
def test_rows_round_trip_within_the_stated_error(load_test_vocab, codec_name, vocab_name):
    V = len(load_test_vocab(vocab_name))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, V + 3, generator=g) * 4
    x[:5, 7:40] = float("-inf")  # masked ids: zero mass
    top = ops.topk_logprobs(x, 64, vocab_size=V)
    ids, lp = top.indices.numpy(), top.logprobs.double().numpy()
    codec = RowCodec(64, V, codec_name)
    got_ids, got = codec.decode(codec.encode(ids, lp))
    assert np.array_equal(got_ids, ids)
    assert codec.id_bytes == id_bytes_for(V) == (3 if V > 65536 else 2)
    err = np.abs(got.astype(np.float64) - lp)
    if codec.quantized:
        levels = 254 if codec_name == "q8" else 65534
        bound = (lp[:, 0] - lp[:, -1]) / (2 * levels)
        # each code is off by at most half a step, and the shift to the exact kept mass by as much again
        assert (err.max(axis=1) <= 2 * bound + 1e-5).all()
    else:
        assert err.max() <= (2e-3 if codec_name == "f16" else 1e-6) * max(1.0, np.abs(lp).max())
    kept = np.log(np.exp(got.astype(np.float64)).sum(1))
    assert np.allclose(kept, np.log(np.exp(lp).sum(1)), atol=1e-5)
    assert codec.bytes_per_position() == 64 * (codec.id_bytes + {"q8": 1, "q16": 2, "f16": 2, "f32": 4}[codec_name]) \
        + 4 + (8 if codec.quantized else 0)


def test_reconstruction_error_reports_the_kl_the_encoding_adds(llama):
    V = len(llama)
    x = torch.randn(64, V, generator=torch.Generator().manual_seed(2)) * 3
    top = ops.topk_logprobs(x, 32, vocab_size=V)
    dense = torch.log_softmax(x.double(), -1).numpy()
    q8 = cache.reconstruction_error(RowCodec(32, V, "q8"), top.indices.numpy(), top.logprobs.double().numpy(), dense)
    f32 = cache.reconstruction_error(RowCodec(32, V, "f32"), top.indices.numpy(), top.logprobs.double().numpy(), dense)
    assert 0 < q8["max_abs_logprob_error"] < 0.05 and f32["max_abs_logprob_error"] < 1e-5
    assert 0 <= f32["mean_kl_encoding"] < 1e-9 < q8["mean_kl_encoding"] < 1e-3


def test_bad_rows_are_refused(llama):
    codec = RowCodec(4, len(llama))
    with pytest.raises(ValueError, match="ids must lie"):
        codec.encode(np.array([[0, 1, 2, len(llama)]]), np.log(np.full((1, 4), 0.25)))
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([[0, 1, 2, 3]]), np.array([[0.0, np.nan, -1, -2]]))
    with pytest.raises(ValueError, match="top-k"):
        RowCodec(0, 10)
    with pytest.raises(ValueError, match="codec"):
        RowCodec(4, 10, "q4")


# ---- writing and reading ------------------------------------------------------------------------
def test_cache_round_trip_equals_the_live_teachers_rows(tmp_path, llama, botchan_text):
    teacher = LinearTeacher(len(llama))
    data_in = texts(botchan_text, 10) + [{"prompt": "Question: who is it?", "response": " It is Botchan."}]
    index = cache.cache_teacher(teacher, data_in, tmp_path, teacher_vocab=llama, top_k=32, max_length=40,
                                batch_size=3, shard_examples=4, logprob_codec="f32", progress=False)
    body = json.loads(index.read_text())
    assert [s["index"] for s in body["shards"]] == [0, 1, 2]
    data = TeacherCache(tmp_path)
    assert len(data) == 11 and data.codec.k == 32
    for i, ex in enumerate(cache.read_examples(data_in)):
        item = data[i]
        ids = item["teacher_ids"]
        assert len(ids) <= 40
        assert item["truncated"] == (len(llama.encode(ex.text)) + 2 > 40)
        assert item["text"].encode() == ex.text.encode()[: len(item["text"].encode())]
        x = teacher(torch.tensor(ids)[None], None)[0]
        live = ops.topk_logprobs(x, 32, vocab_size=len(llama))
        assert np.array_equal(item["topk_indices"], live.indices.numpy())
        assert np.allclose(item["topk_logprobs"], live.logprobs.numpy(), atol=2e-6)
        own = torch.log_softmax(x[:, : len(llama)].double(), -1)[torch.arange(len(ids) - 1), ids[1:]]
        assert np.allclose(item["own_logprob"][:-1], own.numpy(), atol=2e-5)
        assert item["own_logprob"][-1] == -np.inf
    assert data[10]["response_start"] == len("Question: who is it?")
    smaller = TeacherCache(tmp_path, top_k=8)
    assert np.array_equal(smaller[3]["topk_indices"], data[3]["topk_indices"][:, :8])


_RUN = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_cache import LinearTeacher, texts
    from conftest import get_test_vocab
    from ctalign import assets
    from ctalign import cache
    vocab = get_test_vocab("mistral-v1")
    inner = LinearTeacher(len(vocab))
    def slow(ids, att):
        time.sleep({delay})
        return inner(ids, att)
    cache.cache_teacher(slow, texts(assets.path("botchan-text").read_text(encoding="utf-8")[:30000], 18), sys.argv[1], teacher_vocab=vocab, top_k=16,
                        max_length=48, batch_size=2, shard_examples=3, progress=False,
                        rank={rank}, world_size={world})
""")


def _shards_listed(out: Path) -> int:
    try:
        return len(json.loads((out / "index.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_script(out: Path, delay: float = 0.0, rank: int = 0, world: int = 1, kill_at: tuple | None = None):
    """Runs the cache script; with ``kill_at = (shards, seconds)`` sends SIGKILL ``seconds`` after the
    index first lists ``shards`` shards (so the kill always lands part-way, however fast the machine).
    Returns True when the run finished."""
    code = _RUN.format(tests=str(ROOT / "tests"), delay=delay, rank=rank, world=world)
    # the subprocess imports the same ctalign as this process (installed in CI, the working tree in development)
    package_parent = str(Path(__import__("ctalign").__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_parent] + ([os.environ["PYTHONPATH"]]
                                                                          if os.environ.get("PYTHONPATH") else []))}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, stderr=subprocess.PIPE)
    if kill_at is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return True
    shards, seconds = kill_at
    deadline = time.monotonic() + 300
    while proc.poll() is None and _shards_listed(out) < shards and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(seconds)
    if proc.poll() is not None:
        return True  # finished before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return False


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


@pytest.mark.slow
def test_resumed_after_sigkill_is_byte_identical(tmp_path):
    whole = tmp_path / "whole"
    _run_script(whole)
    rng = np.random.default_rng(7)
    resumed = tmp_path / "resumed"
    kills = 0
    for shards in (1, 3, 5):  # 6 shards in all: each run is killed part-way, at a random moment
        if not _run_script(resumed, delay=0.15, kill_at=(shards, float(rng.uniform(0.0, 0.4)))):
            kills += 1
    _run_script(resumed)
    assert kills >= 2  # the test killed runs part-way (a run may finish before its kill)
    assert _files(resumed) == _files(whole)
    assert len(TeacherCache(resumed)) == 18


@pytest.mark.slow
def test_ranks_write_disjoint_shards_that_one_index_merges(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run_script(single)
    _run_script(multi, rank=1, world=2)
    with pytest.raises(CacheError, match="1 of 2 rank indexes"):
        TeacherCache(multi)
    _run_script(multi, rank=0, world=2)
    a, b = TeacherCache(single), TeacherCache(multi)
    assert (multi / "index.json").exists() and len(a) == len(b) == 18
    mine = json.loads((multi / "index-rank1-of-2.json").read_text())["shards"]
    assert [s["index"] for s in mine] == [1, 3, 5]
    for i in range(len(a)):
        for key in ("teacher_ids", "topk_indices", "topk_logprobs", "own_logprob"):
            assert np.array_equal(a[i][key], b[i][key])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_read_the_memory_mapped_shards(tmp_path, mistral, botchan_text, method):
    cache.cache_teacher(LinearTeacher(len(mistral)), texts(botchan_text, 8), tmp_path, teacher_vocab=mistral,
                        top_k=8, max_length=32, shard_examples=3, progress=False)
    data = TeacherCache(tmp_path)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=list,
                                         multiprocessing_context=method)
    got = [item for batch in loader for item in batch]
    assert len(got) == 8
    for i, item in enumerate(got):
        assert np.array_equal(item["topk_indices"], data[i]["topk_indices"])
        assert item["text"] == data[i]["text"]


# ---- bad caches ---------------------------------------------------------------------------------
@pytest.fixture()
def small_cache(tmp_path, mistral, botchan_text):
    cache.cache_teacher(LinearTeacher(len(mistral)), texts(botchan_text, 6), tmp_path, teacher_vocab=mistral,
                        top_k=8, max_length=32, shard_examples=2, progress=False)
    return tmp_path


def test_a_truncated_shard_is_named(small_cache):
    p = small_cache / "shard-00001.ctc"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"shard-00001\.ctc.*truncated"):
        TeacherCache(small_cache)
    with pytest.raises(CacheError, match=r"shard-00001\.ctc.*truncated"):
        TeacherCache(small_cache, verify=False)[2]


def test_a_changed_shard_fails_its_checksum(small_cache):
    p = small_cache / "shard-00002.ctc"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00002\.ctc: checksum mismatch"):
        TeacherCache(small_cache)


def test_a_cache_of_another_teacher_is_refused(small_cache, llama, mistral, load_test_vocab):
    from ctalign import build_map
    data = TeacherCache(small_cache)
    amap = build_map(llama, mistral)
    with pytest.raises(CacheError, match="another teacher tokenizer"):
        data.check_teacher(amap)
    with pytest.raises(CacheError, match="another teacher tokenizer"):
        cache.CachedDistillationCollator(amap, cache=data)
    data.check_teacher(mistral)


def test_k_beyond_the_cache_and_a_rerun_with_other_arguments_are_refused(small_cache, mistral, botchan_text):
    with pytest.raises(CacheError, match="top_k=9 asked, the cache holds k = 8"):
        TeacherCache(small_cache, top_k=9)
    with pytest.raises(CacheError, match="other arguments"):
        cache.cache_teacher(LinearTeacher(len(mistral)), texts(botchan_text, 6), small_cache, teacher_vocab=mistral,
                            top_k=16, max_length=32, shard_examples=2, progress=False)
    (small_cache / "index.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupt index"):
        TeacherCache(small_cache)


def test_teachers_that_return_the_wrong_shape_are_named(tmp_path, mistral):
    with pytest.raises(CacheError, match="narrower than its vocabulary"):
        cache.cache_teacher(lambda ids, att: torch.zeros(ids.shape[0], ids.shape[1], 100), ["some text"], tmp_path,
                            teacher_vocab=mistral, progress=False)
    with pytest.raises(CacheError, match="expected logits"):
        cache.cache_teacher(lambda ids, att: torch.zeros(3), ["some text"], tmp_path / "b", teacher_vocab=mistral,
                            progress=False)
    with pytest.raises(CacheError, match="no such dataset file"):
        cache.cache_teacher(LinearTeacher(len(mistral)), [tmp_path / "none.jsonl"], tmp_path / "c",
                            teacher_vocab=mistral, progress=False)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from ctalign.cli import main
    assert main(["cache-teacher", str(tmp_path / "nope"), str(tmp_path / "d.txt"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such teacher model" in err


# ---- losses from cached rows --------------------------------------------------------------------
def test_every_loss_trains_from_cached_rows_as_from_the_live_teacher(tmp_path, llama, mistral, botchan_text):
    """Each loss on the collator's cached TopK rows equals the same loss on the live teacher's top-k rows
    of the same batch (f32 codec: the cached rows are the live rows), and gives a gradient."""
    from ctalign import build_map
    from ctalign import losses as L

    teacher = LinearTeacher(len(llama))
    cache.cache_teacher(teacher, texts(botchan_text, 4), tmp_path, teacher_vocab=llama, top_k=64, max_length=48,
                        logprob_codec="f32", progress=False)
    data = TeacherCache(tmp_path)
    amap = build_map(llama, mistral)
    b = cache.CachedDistillationCollator(amap, cache=data, byte_queries=4)([data[i] for i in range(4)])
    with torch.no_grad():
        live_logits = teacher(b["teacher_input_ids"], None)
    live = ops.topk_logprobs(live_logits, 64, vocab_size=len(llama))
    Ls = b["student_input_ids"].shape[1]
    s_logits = torch.randn(4, Ls, len(mistral) + 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    common = dict(student_mask=b["student_loss_mask"])
    runs = {
        "uld": lambda t: L.uld_loss(s_logits, t, b["student_input_ids"], alignment=b["alignment"],
                                    teacher_mask=b["teacher_loss_mask"], top_k=32, **common),
        "likelihood": lambda t: L.likelihood_distillation_loss(s_logits, t, b["student_input_ids"], b["alignment"],
                                                               amap, **common),
    }
    for name, fn in runs.items():
        got, want = fn(b["teacher_topk"]), fn(live)
        assert torch.isfinite(got), name
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (name, got, want)
        (g,) = torch.autograd.grad(got, s_logits)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    alm_cached = L.alm_loss(s_logits, None, b["student_input_ids"], b["teacher_input_ids"], b["alignment"],
                            teacher_own_logprob=b["teacher_own_logprob"], teacher_vocab=llama, **common)
    alm_live = L.alm_loss(s_logits, live_logits, b["student_input_ids"], b["teacher_input_ids"], b["alignment"],
                          teacher_vocab=llama, **common)
    assert torch.allclose(alm_cached, alm_live, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="debias"):
        L.alm_loss(s_logits, None, b["student_input_ids"], b["teacher_input_ids"], b["alignment"],
                   teacher_own_logprob=b["teacher_own_logprob"], debias=True, student_vocab=mistral,
                   teacher_vocab=llama)
