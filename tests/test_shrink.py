"""shrink_vocab: the shrunk tokenizer is a working HF tokenizer, maps in the subset regime from its
teacher and identically to itself, and tokenizes real text as the teacher does, unrolled."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from ctalign.alignment_map import build_map
from ctalign.errors import CtalignError
from ctalign.shrink import _hf_pattern, _remap_post_processor, shrink_vocab
from ctalign.vocab import load_vocab

# an HF byte-level BPE teacher (merge list) and tiktoken teachers (merges recovered from ranks;
# qwen normalizes to NFC)
TEACHERS = {"llama3": 2000, "cl100k": 3000, "qwen": 1500}
# qwen repeats what cl100k shows (tiktoken ranks) plus NFC: slow on 2 cores (151k teacher tokens
# through a 1.5k-token student)
NAMES = ["llama3", "cl100k", pytest.param("qwen", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def shrunk(load_test_vocab, tmp_path_factory):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            teacher = load_test_vocab(name)
            out = tmp_path_factory.mktemp(f"shrunk-{name}")
            info = shrink_vocab(teacher, TEACHERS[name], out)
            student = load_vocab(out)
            cache[name] = (teacher, student, info, out, build_map(teacher, student))
        return cache[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_tokenizer_is_a_subset(shrunk, name):
    teacher, student, info, out, amap = shrunk(name)
    n = TEACHERS[name]
    assert amap.regime == "subset", amap.report()["subset_check"]
    assert student.kind == "byte_bpe" and len(student) == n + len(teacher.specials)
    assert info["regular_tokens"] == n and info["specials"] == len(teacher.specials)
    # every regular token is a teacher token: the teacher's bytes, then merges in the teacher's order
    rank = {t: k for k, t in enumerate(teacher.ranks)} if teacher.ranks else None
    student_bytes = [student.token_bytes(i) for i in range(n)]
    assert all(b is not None for b in student_bytes)
    teacher_ids = [teacher.ids_of_bytes(b)[0] for b in student_bytes]
    assert sorted(teacher_ids) == teacher_ids  # ids keep the teacher's relative order
    assert {b for b in student_bytes if len(b) == 1} == {bytes([x]) for x in range(256)}
    if rank is not None:  # tiktoken: the lowest ranks among the tokens that merges create
        merged = np.flatnonzero(np.asarray(teacher.merge_table.left) >= 0).tolist()
        kept = set(teacher_ids)
        kept_ranks = [rank[t] for t in merged if t in kept]
        assert len(kept_ranks) == n - 256
        assert max(kept_ranks) < min(rank[t] for t in merged if t not in kept)


@pytest.mark.parametrize("name", NAMES)
def test_specials_reindexed_after_regular_tokens(shrunk, name):
    teacher, student, info, out, amap = shrunk(name)
    n = TEACHERS[name]
    specials = sorted(teacher.specials)
    assert sorted(student.specials) == list(range(n, n + len(specials)))
    for k, t in enumerate(specials):
        assert student.special_text[n + k] == teacher.special_text[t]
    for role in ("bos", "eos", "pad", "unk"):
        if role in teacher.special_ids:
            assert student.special_text[student.special_ids[role]] == teacher.special_text[teacher.special_ids[role]]
    # the teacher's specials map to the student's (same role, else same text): nothing to the end column
    assert amap.report()["specials"]["to_end_column"] == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["ctalign_shrunk_from"]["fingerprint"] == teacher.fingerprint


@pytest.mark.parametrize("name", NAMES)
def test_encodings_are_the_unrolled_teacher_encodings(shrunk, name, corpus_lines, botchan_text):
    teacher, student, info, out, amap = shrunk(name)
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    offsets, ids = amap.dec_offsets.tolist(), amap.dec_ids.tolist()
    texts = corpus_lines + [botchan_text[:20000]]
    for text in texts:
        unrolled = [s for t in teacher.encode(text) for s in ids[offsets[t]:offsets[t + 1]]]
        got = student.encode(text)
        assert got == unrolled, f"{name}: {text[:60]!r}"
        assert hf.encode(text, add_special_tokens=False).ids == got
        assert student.decode_bytes(got) == teacher.decode_bytes(teacher.encode(text))


@pytest.mark.parametrize("name", ["llama3", "cl100k"])
def test_shrunk_to_itself_is_identical(shrunk, name):
    _, student, _, _, _ = shrunk(name)
    m = build_map(student, student)
    assert m.regime == "identical"
    assert m.report()["specials"]["to_end_column"] == 0


def test_pipeline_kept_and_post_processor_ids_remapped(shrunk):
    teacher, student, _, out, _ = shrunk("llama3")
    doc = json.loads((out / "tokenizer.json").read_text())
    src = json.loads(open(teacher.source).read())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert doc[key] == src[key], key
    assert doc["model"]["ignore_merges"] == src["model"].get("ignore_merges", False)
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert hf.decode(hf.encode("hello  wörld 123").ids, skip_special_tokens=True) == "hello  wörld 123"
    # a template post-processor (Llama-3 chat checkpoints carry one) gets the new special ids
    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                         "tokens": ["<|begin_of_text|>"]}}}
    bos = student.special_ids["bos"]
    remapped = _remap_post_processor(template, {"<|begin_of_text|>": bos})
    assert remapped["special_tokens"]["<|begin_of_text|>"]["ids"] == [bos]
    assert _remap_post_processor({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]},
                                 {"</s>": 7, "<s>": 6}) == {"type": "RobertaProcessing", "sep": ["</s>", 7],
                                                             "cls": ["<s>", 6]}


def test_gpt2_pair_teacher(load_test_vocab, tmp_path):
    teacher = load_test_vocab("gpt2")
    shrink_vocab(teacher, 700, tmp_path)
    student = load_vocab(tmp_path)
    text = "The quick brown fox, 12345 times: don't stop!  Ünïcödé  "
    full = build_map(teacher, student)
    assert full.regime == "subset"
    offsets, ids = full.dec_offsets.tolist(), full.dec_ids.tolist()
    assert student.encode(text) == [s for t in teacher.encode(text) for s in ids[offsets[t]:offsets[t + 1]]]


def test_bad_requests(load_test_vocab, tmp_path):
    with pytest.raises(CtalignError, match=r"must lie in \[256, "):
        shrink_vocab(load_test_vocab("cl100k"), 100, tmp_path / "a")
    with pytest.raises(CtalignError, match="must lie in"):
        shrink_vocab(load_test_vocab("cl100k"), 10**7, tmp_path / "a")
    with pytest.raises(CtalignError, match="byte-level BPE teacher.*unigram"):
        shrink_vocab(load_test_vocab("botchan-unigram"), 500, tmp_path / "b")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CtalignError, match="not a directory"):
        shrink_vocab(load_test_vocab("cl100k"), 300, f)


def test_hf_pattern_drops_possessive_interval_only():
    assert _hf_pattern(r"\p{N}{1,3}+|\s++$|[^\r\n]?+x") == r"\p{N}{1,3}|\s++$|[^\r\n]?+x"
    assert _hf_pattern(r"a{2}+b{3,}+") == r"a{2}b{3,}"
    assert np.all([_hf_pattern(p) == p for p in (r"\p{N}{1,3}", r" ?\p{L}+")])
