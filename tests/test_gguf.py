"""GGUF vocabularies: llama.cpp's own reference tokenisations, the two real small models, build-map
between them, and damaged files.

The reference files are llama.cpp's ``models/ggml-vocab-*.gguf`` with ``.gguf.inp`` (test strings,
each followed by ``\\n__ggml_vocab_test__\\n``) and ``.gguf.out`` (one line of space-separated ids
per string), from the llama-cpp-python 0.3.36 sdist (ctalign.assets)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctalign import assets
from ctalign.errors import VocabError
from ctalign.vocab import load_vocab

SEP = "\n__ggml_vocab_test__\n"
ROOT = Path(__file__).resolve().parents[1]

# Reference files whose tokenizer type / pre-tokenizer ctalign supports, and the others with the
# words their one-line error must hold.
SUPPORTED = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm",
             "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]
UNSUPPORTED = {"bert-bge": "'bert'", "gemma-4": "'gemma4'", "nomic-bert-moe": "'t5'",
               "aquila": "without tokenizer.ggml.pre", "gpt-neox": "without tokenizer.ggml.pre"}
LOAD_ONLY = ["baichuan"]  # supported type, no test strings


def _asset(name: str) -> Path:
    try:
        return assets.path(name)
    except assets.AssetError as e:  # no registry here: the CI fetches them first
        pytest.skip(f"asset {name} unavailable: {e}")


def read_cases(gguf: Path) -> tuple[list[str], list[list[int]]]:
    """llama.cpp's test-tokenizer-0 format: every string ends with SEP; one .out line per string."""
    raw = Path(str(gguf) + ".inp").read_bytes().decode("utf-8")
    assert raw.endswith(SEP)
    texts = raw[: -len(SEP)].split(SEP)
    lines = Path(str(gguf) + ".out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(texts) == len(ids)
    return texts, ids


@pytest.mark.parametrize("name", SUPPORTED)
def test_reference_tokenisations(name, capsys):
    path = _asset(f"ggml-vocab-{name}")
    _asset(f"ggml-vocab-{name}.inp")
    _asset(f"ggml-vocab-{name}.out")
    vocab = load_vocab(path)
    texts, expected = read_cases(path)
    failed = [(t, e, vocab.encode(t)) for t, e in zip(texts, expected) if vocab.encode(t) != e]
    with capsys.disabled():
        print(f"\n  {path.name}: {len(texts) - len(failed)}/{len(texts)} reference cases pass "
              f"({vocab.kind}, pre {vocab.details.get('pre')})", end="")
    assert not failed, failed[:3]
    # the bytes of the ids spell the text (plus the SentencePiece prefix space)
    for t, e in zip(texts, expected):
        want = t.encode()
        if vocab.prefix_space and t:
            want = b" " + want
        assert vocab.decode_bytes(e) == want, t


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_reference_files(name):
    path = _asset(f"ggml-vocab-{name}")
    with pytest.raises(VocabError) as info:
        load_vocab(path)
    msg = str(info.value)
    assert str(path) in msg and UNSUPPORTED[name] in msg and "supported:" in msg and "\n" not in msg


@pytest.mark.parametrize("name", LOAD_ONLY)
def test_load_only_reference_files(name):
    vocab = load_vocab(_asset(f"ggml-vocab-{name}"))
    assert vocab.kind == "sentencepiece_bpe" and len(vocab) == 64000


def test_unknown_pre_tokenizer_is_an_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("no-such-pre")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VocabError, match="pre-tokenizer 'no-such-pre'.*supported:"):
        load_vocab(p)


# ---- the real models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma():
    p = _asset("gemma3-gguf")
    t0 = time.perf_counter()
    v = load_vocab(p)
    print(f"\n  gemma GGUF ({p.stat().st_size:,} bytes) loaded in {time.perf_counter() - t0:.2f} s", end="")
    return v


@pytest.fixture(scope="module")
def smollm():
    return load_vocab(_asset("smollm2-gguf"))


def test_real_models_load(gemma, smollm):
    assert (gemma.kind, len(gemma), gemma.details["n_tensors"]) == ("sentencepiece_bpe", 262144, 236)
    assert gemma.special_ids["bos"] == 2 and gemma.special_ids["eos"] == 1 and gemma.special_ids["pad"] == 0
    assert not gemma.prefix_space and gemma.token_bytes(107) == b"\n"  # user-defined, literal text
    assert gemma.token_bytes(238) == b"\x00"  # <0x00>
    assert (smollm.kind, len(smollm), smollm.details["pre"]) == ("byte_bpe", 49152, "smollm")
    assert smollm.special_ids["eos"] == 2 and smollm.special_ids["bos"] == 1
    text = "Hello world, it's 2024!\n\n  spaces  and ünïcödé 🦙"
    for v in (gemma, smollm):
        assert v.decode_bytes(v.encode(text)) == text.encode()


def _corpus() -> list[str]:
    lines = _asset("botchan-text").read_text(encoding="utf-8").split("\n")
    return ["\n".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]


def _hf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _hf_encode(tok, text):
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _bytes_check(vocab, tok):
    """Every id with valid UTF-8 bytes decodes to the same text in transformers."""
    checked = 0
    for i in range(len(vocab)):
        b = vocab.token_bytes(i)
        if b is None:
            continue
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.decode([i], clean_up_tokenization_spaces=False) == s, i
        checked += 1
    return checked


@pytest.mark.slow
def test_gemma_matches_its_own_tokenizer(gemma):
    tok = _hf_tokenizer(_asset("gemma3-gguf"))
    assert _bytes_check(gemma, tok) > 250_000
    corpus = _corpus()
    differ = [t for t in corpus if gemma.encode(t) != _hf_encode(tok, t)]
    assert len(corpus) > 500 and differ == []


@pytest.mark.slow
def test_smollm_matches_its_own_tokenizer_but_the_digit_rule(smollm, capsys):
    """transformers' GGUF conversion of SmolLM2 drops the 'smollm' digit split; llama.cpp (and
    the model's original tokenizer.json: Digits(individual_digits) then ByteLevel) keeps it.
    Every text that differs differs only through that rule."""
    from tokenizers import pre_tokenizers
    tok = _hf_tokenizer(_asset("smollm2-gguf"))
    assert _bytes_check(smollm, tok) > 48_000
    from ctalign.vocab.base import gpt2_token_bytes
    tokens = tok.convert_ids_to_tokens(list(range(len(smollm))))  # every id, exact bytes
    assert all(gpt2_token_bytes(t) == smollm.token_bytes(i) for i, t in enumerate(tokens) if i not in smollm.specials)
    corpus = _corpus()
    differ = [t for t in corpus if smollm.encode(t) != _hf_encode(tok, t)]
    with capsys.disabled():
        for t in differ:
            print(f"\n  smollm differs from transformers' GGUF tokenizer on {t[:60]!r}...", end="")
    assert 0 < len(differ) < 5
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert [t for t in corpus if smollm.encode(t) != _hf_encode(tok, t)] == []


def _cli(*args, env=None):
    # the subprocess imports the same ctalign as this process (installed in CI, the working tree in development)
    package_parent = str(Path(__import__("ctalign").__file__).resolve().parents[1])
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent] + ([os.environ["PYTHONPATH"]]
                                                                        if os.environ.get("PYTHONPATH") else [])),
             **(env or {}))
    return subprocess.run([sys.executable, "-m", "ctalign.cli", *args], capture_output=True, text=True, env=e)


def test_build_map_gemma_to_smollm(tmp_path):
    import json
    g, s = _asset("gemma3-gguf"), _asset("smollm2-gguf")
    out = tmp_path / "g2s.ctmap"
    r = _cli("build-map", str(g), str(s), "-o", str(out), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["regime"] == "general"
    assert rep["teacher"]["size"] == 262144 and rep["student"]["size"] == 49152
    assert rep["identical_pairs"] == 46253
    assert rep["uncovered_student_tokens"] == 2133
    # SmolLM2 has no byte tokens for some bytes (0x04, 0xc0, ...): the teacher's byte pieces for
    # them get an empty dec_S, as llama.cpp drops bytes without a token.
    assert any("23 teacher tokens have an empty dec_S" in w for w in rep["warnings"])
    assert out.stat().st_size > 0


# ---- damaged files ---------------------------------------------------------------------------------
def test_truncated_and_mutated_files(tmp_path):
    src = _asset("ggml-vocab-gpt-2").read_bytes()
    rng = random.Random(18)
    cuts = [0, 3, 4, 8, 16, 23, 24, 40, 100, 1000, 5000] + sorted(rng.sample(range(1000, len(src)), 12))
    p = tmp_path / "bad.gguf"
    outcomes = {"error": 0, "loaded": 0}
    for n in cuts:
        p.write_bytes(src[:n])
        with pytest.raises(VocabError) as info:
            load_vocab(p)
        assert str(p) in str(info.value) and "\n" not in str(info.value)
    for _ in range(60):
        data = bytearray(src)
        for _ in range(rng.choice([1, 4, 16])):
            k = rng.randrange(0, 200_000)  # the header and the start of the token list
            data[k] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))
        try:
            v = load_vocab(p)
            v.encode("Hello world")
            outcomes["loaded"] += 1
        except VocabError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_a_byte_level_token_typed_without_bytes_that_merges_make_is_refused(tmp_path):
    """Found by the fuzz campaign (gguf:1034, seed 1): GPT-2's merge result 'Ġca' typed unknown loaded,
    and encode('café') then gave an id without bytes, so its bytes dropped ' ca'."""
    _asset("ggml-vocab-gpt-2")
    from tests.fuzz.gguf_trial import ARR, I32, base_fields, write_gguf
    fields = [list(f) for f in base_fields("gpt2")]
    tokens = dict((k, v) for k, _, v in fields)["tokenizer.ggml.tokens"][1]
    types = list(dict((k, v) for k, _, v in fields)["tokenizer.ggml.token_type"][1])
    for ty, name in ((2, "unknown"), (3, "control"), (5, "unused")):
        bad = list(types)
        bad[tokens.index("Ġca")] = ty
        p = tmp_path / f"typed-{name}.gguf"
        p.write_bytes(write_gguf([(k, t, (I32, bad)) if k == "tokenizer.ggml.token_type" else (k, t, v)
                                  for k, t, v in fields]))
        with pytest.raises(VocabError, match=f"'Ġca'.*typed {name}.*no bytes"):
            load_vocab(p)
    p = tmp_path / "genuine.gguf"
    p.write_bytes(write_gguf([tuple(f) for f in fields]))
    v = load_vocab(p)
    assert v.decode_bytes(v.encode("naïve café")) == "naïve café".encode()


def test_cli_one_line_error(tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(_asset("ggml-vocab-gpt-2").read_bytes()[:777])
    r = _cli("build-map", str(p), str(p), "-o", str(tmp_path / "x.ctmap"), "--quiet")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctalign: error:") and "cut.gguf" in lines[0]


@pytest.mark.slow
def test_load_gguf_model_smollm():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    from ctalign.models import load_gguf_model
    model, vocab = load_gguf_model(_asset("smollm2-gguf"))
    assert getattr(model, "hf_quantizer", None) is None or not getattr(model, "is_quantized", False)
    ids = vocab.encode("The quick brown fox")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape[-1] >= len(vocab) and logits.shape[1] == len(ids)
    assert torch.isfinite(logits).all()
