"""On-policy examples: the student continues each example's prompt by sampling, and the teachers then
score the student's own continuation (the loss masks cover the sampled response).

An example with a prompt keeps it; a whole text is cut after its first half (at a space when there
is one) and that half is the prompt. The continuation is ``tokens`` sampled tokens at temperature 1,
turned into text through the student's token bytes (a character cut at the end is dropped); the
collator then tokenizes prompt + continuation canonically on both sides.
"""
from __future__ import annotations

import random
from typing import Sequence

from ctalign.data import Example


def _prompt_of(ex: Example) -> str:
    if not ex.whole_text:
        return ex.prompt
    text = ex.text
    half = len(text) // 2
    cut = text.rfind(" ", 0, half)
    return text[: cut if cut > 0 else half]


def continue_prompts(model, vocab, examples: Sequence[Example], tokens: int, rng: random.Random) -> list[Example]:
    import torch

    bos = vocab.special_ids.get("bos")
    eos = vocab.special_ids.get("eos")
    out = []
    for ex in examples:
        prompt = _prompt_of(ex)
        ids = ([bos] if bos is not None else []) + vocab.encode(prompt)
        if not ids:
            out.append(ex)
            continue
        torch.manual_seed(rng.randrange(1 << 31))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 pad_token_id=eos if eos is not None else 0)
        if was_training:
            model.train()
        new = [int(t) for t in gen[0, len(ids):] if eos is None or int(t) != eos]
        text = b"".join(vocab.token_bytes(t) or b"" for t in new).decode("utf-8", errors="ignore")
        out.append(Example(prompt, text, False))
    return out
