"""Held-out bits per byte: the measure that compares language models across tokenizers.

For each text, ``[bos] + encode(text)`` (cut to ``max_length`` tokens) is scored by the model; the
sum of ``-log2 p`` over every token after the bos, divided by the UTF-8 bytes those tokens spell
(the dummy-prefix space of SentencePiece-style tokenizers is not counted: it is not in the text).
"""
from __future__ import annotations

import math
from typing import Sequence


def _encoded(vocab, text: str, max_length: int) -> tuple[list[int], int]:
    bos = vocab.special_ids.get("bos")
    ids = ([bos] if bos is not None else []) + vocab.encode(text)
    ids = ids[:max_length]
    first = 1 if bos is not None else 0
    n_bytes = sum(len(vocab.token_bytes(t) or b"") for t in ids[first:])
    if vocab.prefix_space and not text.startswith(" ") and n_bytes:
        n_bytes -= 1
    return ids, n_bytes


def bits_per_byte(model, vocab, texts: Sequence[str], *, max_length: int = 512, batch_size: int = 4,
                  device=None) -> dict:
    """``{"bits_per_byte", "bytes", "tokens", "texts"}`` of ``model`` (a transformers causal LM, or any
    callable ``(input_ids, attention_mask) -> logits``) on ``texts``."""
    import torch

    encoded = [_encoded(vocab, t, max_length) for t in texts if t.strip()]
    if not encoded:
        raise ValueError("no evaluation text")
    V = len(vocab)
    pad = int(vocab.special_ids.get("pad", vocab.special_ids.get("eos", 0)))
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    nll, n_bytes, n_tokens = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            L = max(len(e[0]) for e in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, (e, _) in enumerate(chunk):
                ids[r, : len(e)] = torch.tensor(e)
                att[r, : len(e)] = 1
            if device is not None:
                ids, att = ids.to(device), att.to(device)
            out = model(input_ids=ids, attention_mask=att) if hasattr(model, "config") else model(ids, att)
            logits = getattr(out, "logits", out)
            lp = torch.log_softmax(logits[:, :-1, :V].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            m = att[:, 1:].bool()
            nll -= float(lp[m].sum())
            n_tokens += int(m.sum())
            n_bytes += sum(b for _, b in chunk)
    if was_training:
        model.train()
    return {"bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "bytes": n_bytes, "tokens": n_tokens,
            "texts": len(encoded)}
