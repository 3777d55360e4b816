"""What the benchmark knows: the vocabularies it runs on, the ops and their dtypes, the size units.
"""
from __future__ import annotations





GiB = 1 << 30
MiB = 1 << 20

# Short names of the real vocabularies (ctalign.assets names), smallest first; sizes with specials.
VOCABS: dict[str, str] = {
    "mistral-v1": "mistral-v1",      # SentencePiece BPE with byte fallback, 32,000
    "gpt2": "gpt2-encoder",          # GPT-2 encoder.json + vocab.bpe (gpt2-merges), 50,257
    "cl100k": "cl100k",              # tiktoken ranks, 100,277
    "llama3": "llama3",              # HF byte-level BPE, 128,256
    "deepseek": "deepseek-v3",       # HF byte-level BPE, 129,280
    "tekken": "tekken",              # Mistral Tekken, 131,072
    "qwen": "qwen",                  # tiktoken ranks, 151,851
}
# No public 262k tokenizer ships in a registry package: this vocabulary is the union of the byte
# strings of several real vocabularies, cut to 262,144 tokens (see ``synthetic_vocab``).
SYNTHETIC_VOCAB = "union262k"
SYNTHETIC_SIZE = 262_144
_UNION_SOURCES = ("qwen", "llama3", "deepseek", "tekken", "cl100k", "gpt2", "mistral-v1", "bert-uncased")

# Ops of ctalign.ops the suite times (`--ops`), and what each reads.
OPS = {
    "next_byte": "next_byte_logprobs(logits, vocab) -> [N, 257]",
    "byte_conditional": "byte_conditional_logprobs(logits, vocab, rows, prefixes) -> [Q, 257]",
    "project": "project_to_student(logits, amap) -> [N, V_s + 1]",
    "project_within": "project_to_student_within(logits, amap, rows, consumed) -> [Q, V_s + 1]",
    "cover": "cover_logmass(logits, amap) -> [N, V_s]",
    "next_byte_topk": "next_byte_logprobs(TopK) -> [N, 257]",
    "project_topk": "project_to_student(TopK) -> [N, V_s + 1]",
    "project_topk_sparse": "project_to_student(TopK, sparse=True) -> TopK [N, k]",
    "cover_topk": "cover_logmass(TopK) -> [N, V_s]",
    "project_within_topk": "project_to_student_within(TopK, amap, rows, consumed) -> [Q, V_s + 1]",
    "project_within_topk_sparse": "project_to_student_within(TopK, ..., sparse=True) -> TopK [Q, k]",
    "cover_topk_sparse": "cover_logmass(TopK, sparse=True) -> TopK [N, w]",
    "uld": "ULD loss, top-k (ctalign.losses) vs the full sort-based formulation",
    "topk_logprobs": "topk_logprobs(logits, k) -> TopK [N, k] (e.g. caching a teacher's outputs)",
}
_BYTE_OPS = {"next_byte", "byte_conditional", "next_byte_topk", "topk_logprobs"}  # teacher-only ops
_TOPK_OPS = {"next_byte_topk", "project_topk", "project_topk_sparse", "cover_topk", "project_within_topk",
             "project_within_topk_sparse", "cover_topk_sparse"}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_PAD_TO = 128  # logits widths are rounded up like a model's padded output layer
_SEED = 1234
