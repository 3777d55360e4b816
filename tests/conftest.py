"""Shared test fixtures: real tokenizers (loaded once per session) and a multilingual corpus.

    def test_something(load_test_vocab, corpus_text):
        llama = load_test_vocab("llama3")          # a ctalign.vocab.Vocab, cached per session
        ids = llama.encode(corpus_text)

Vocabulary names are the asset names of ``ctalign.assets`` (``llama3``, ``qwen``, ``mistral-v1``,
...), plus ``gpt2`` for the GPT-2 ``encoder.json`` + ``vocab.bpe`` pair. ``TEST_VOCABS`` lists them
all; ``BIG_VOCABS`` the 100k+ ones.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

TEST_VOCABS = [
    "gpt2", "gpt2-tiktoken", "whisper-multilingual", "llama3", "qwen", "deepseek-v3", "cl100k",
    "mistral-v1", "mistral-v3", "tekken", "botchan-bpe", "botchan-unigram", "kyoto-unigram",
    "bert-uncased",
]
BIG_VOCABS = ["llama3", "qwen", "deepseek-v3", "cl100k", "tekken"]

# Characters that files and editors tend to mangle: added to the corpus in code.
CORPUS_EXTRA = (
    "\nWhitespace runs:  two   three    four     five      six.\n"
    "\tone tab\n\t\ttwo tabs\n\t \t mixed \t\n"
    "trailing spaces   \n   leading spaces\n\n\n\nafter three blank lines\n"
    "Windows line endings\r\nsecond line\r\n\r\n"
    "no\u00a0break\u00a0spaces, narrow\u202fno-break, ideographic\u3000space, zero\u200bwidth\n"
    "decomposed e\u0301 vs precomposed \u00e9, a\u0308 vs \u00e4, Hangul jamo \u1100\u1161\u11a8\n"
    "last line without newline"
)


def vocab_spec(name: str):
    """What ``load_vocab`` takes for a test vocabulary name."""
    from ctalign import assets
    if name == "gpt2":
        return (assets.path("gpt2-encoder"), assets.path("gpt2-merges"))
    return assets.path(name)


@functools.lru_cache(maxsize=None)
def get_test_vocab(name: str):
    """Load (once per process) the real tokenizer called ``name``."""
    from ctalign.vocab import load_vocab
    return load_vocab(vocab_spec(name), name=name)


@pytest.fixture(scope="session")
def load_test_vocab():
    """The cached loader: ``load_test_vocab(name) -> Vocab``."""
    return get_test_vocab


@functools.lru_cache(maxsize=None)
def get_corpus_text() -> str:
    return (DATA / "corpus.txt").read_text(encoding="utf-8") + CORPUS_EXTRA


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """Multilingual test text: English prose, code, CJK, Japanese, Korean, Arabic, Cyrillic, Greek,
    Hebrew, Hindi, Thai, emoji (ZWJ sequences, flags, skin tones), whitespace runs, tabs, CRLF,
    long digit runs, punctuation, combining characters. Contains no U+2581."""
    return get_corpus_text()


@pytest.fixture(scope="session")
def corpus_lines(corpus_text) -> list[str]:
    """The corpus split into lines (line ends kept), empty lines dropped."""
    return [line for line in corpus_text.splitlines(keepends=True) if line.strip()]


@pytest.fixture(scope="session")
def botchan_text() -> str:
    """The first ~30k characters of an English novel (``botchan-text`` asset)."""
    from ctalign import assets
    return assets.path("botchan-text").read_text(encoding="utf-8")[:30000]
