"""A collator that tokenizes texts with both tokenizers and returns padded tensors ready for the losses.

    >>> collate = DistillationCollator(amap, max_length=512, byte_queries=10)      # doctest: +SKIP
    >>> batch = collate(["some text", {"prompt": "Q: 2+2?", "response": " 4"}])    # doctest: +SKIP
    >>> loss = likelihood_loss(student(batch["student_input_ids"]).logits, teacher_logits,
    ...                        batch["student_input_ids"], batch["alignment"],
    ...                        student_mask=batch["student_loss_mask"])            # doctest: +SKIP

Examples: a ``str`` (a whole text, every token a target), a ``(prompt, response)`` tuple or a dict
with ``prompt`` and ``response`` (targets: the response tokens and the closing eos), or a dict with
``text``. Each side encodes ``[bos] + encode(prompt) + encode(response) + [eos]`` with its own
tokenizer (``Vocab.encode``; bos/eos only where the vocabulary has them and ``add_bos``/``add_eos``
ask for them). Prompt and response are encoded separately, so the prompt's end is a boundary of
both tokenizations and the loss masks of both sides cover exactly the same bytes.

Truncation (``max_length``, per side, specials included): the text is cut at the last byte offset
that is a token boundary on both sides and keeps both sides within the limit; the eos is then
dropped (the text did not end there). Padding is on the right with each side's pad id.

Output (a dict): ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_loss_mask``,
``student_*`` the same, ``alignment`` (:class:`ctalign.align.Alignment`, lengths included),
``texts`` (the aligned texts, after truncation) and ``response_start`` (byte offset per row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ctalign import align as _align

__all__ = ["DistillationCollator", "Example", "encode_example"]


@dataclass
class Example:
    prompt: str
    response: str
    whole_text: bool  # no prompt/response split: every token is a target

    @property
    def text(self) -> str:
        return self.prompt + self.response


def _as_example(x: Any, i: int) -> Example:
    if isinstance(x, str):
        return Example("", x, True)
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(p, str) for p in x):
        return Example(x[0], x[1], False)
    if isinstance(x, dict):
        if "text" in x and isinstance(x["text"], str):
            return Example("", x["text"], True)
        if isinstance(x.get("prompt"), str) and isinstance(x.get("response"), str):
            return Example(x["prompt"], x["response"], False)
    raise TypeError(f"example {i}: expected a str, a (prompt, response) pair or a dict with 'text' or "
                    f"'prompt' and 'response', got {type(x).__name__}")


def encode_example(vocab, ex: Example, add_bos: bool, add_eos: bool) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one example with one tokenizer."""
    ids: list[int] = []
    mask: list[int] = []
    bos = vocab.special_ids.get("bos") if add_bos else None
    eos = vocab.special_ids.get("eos") if add_eos else None
    if bos is not None:
        ids.append(bos)
        mask.append(0)
    if ex.prompt:
        p = vocab.encode(ex.prompt)
        ids += p
        mask += [1 if ex.whole_text else 0] * len(p)
    if ex.response:
        r = vocab.encode(ex.response)
        ids += r
        mask += [1] * len(r)
    if eos is not None:
        ids.append(eos)
        mask.append(1)
    return ids, mask


def _pad_id(vocab) -> int:
    for role in ("pad", "eos", "unk"):
        if role in vocab.special_ids:
            return int(vocab.special_ids[role])
    return 0


class DistillationCollator:
    """Tokenizes a batch with the teacher's and the student's tokenizers and aligns them.

    ``amap``: the :class:`~ctalign.AlignmentMap` (gives both vocabularies and the dec trie); or
    ``teacher_vocab`` + ``student_vocab``. ``max_length``: per-side token limit (int, or a
    ``(teacher, student)`` pair). ``byte_queries``: K for BLD (``align(..., byte_queries=K)``).
    ``return_tensors``: ``"pt"`` (torch) or ``"np"``.
    """

    def __init__(self, amap=None, *, teacher_vocab=None, student_vocab=None, max_length=None,
                 add_bos: bool = True, add_eos: bool = True, byte_queries: int = 0, threads: int | None = None,
                 return_tensors: str = "pt"):
        teacher_vocab, student_vocab = _align.vocabs_of_map(amap, teacher_vocab, student_vocab, "DistillationCollator")
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        self.amap, self.teacher_vocab, self.student_vocab = amap, teacher_vocab, student_vocab
        if max_length is None or isinstance(max_length, int):
            self.max_length = (max_length, max_length)
        else:
            self.max_length = tuple(max_length)
        for m in self.max_length:
            if m is not None and m < 2:
                raise ValueError(f"max_length must be at least 2, got {m}")
        self.add_bos, self.add_eos = add_bos, add_eos
        self.byte_queries, self.threads, self.return_tensors = int(byte_queries), threads, return_tensors

    def __call__(self, batch: Sequence[Any]) -> dict:
        if len(batch) == 0:
            raise ValueError("empty batch")
        examples = [_as_example(x, i) for i, x in enumerate(batch)]
        tv, sv = self.teacher_vocab, self.student_vocab
        t_rows, s_rows, texts, starts = [], [], [], []
        for ex in examples:
            t_ids, t_mask = encode_example(tv, ex, self.add_bos, self.add_eos)
            s_ids, s_mask = encode_example(sv, ex, self.add_bos, self.add_eos)
            text = ex.text
            if self._too_long(len(t_ids), len(s_ids)):
                t_ids, t_mask, s_ids, s_mask, text = self._truncate(ex, t_ids, t_mask, s_ids, s_mask)
            t_rows.append((t_ids, t_mask))
            s_rows.append((s_ids, s_mask))
            texts.append(text)
            starts.append(len(ex.prompt.encode("utf-8")))
        return self._batch(t_rows, s_rows, texts, starts)

    def _batch(self, t_rows, s_rows, texts, starts) -> dict:
        """Pads both sides, aligns them and returns the batch dict (tensors or arrays)."""
        tv, sv = self.teacher_vocab, self.student_vocab
        t_ids, t_att, t_loss = self._pad([r[0] for r in t_rows], [r[1] for r in t_rows], _pad_id(tv))
        s_ids, s_att, s_loss = self._pad([r[0] for r in s_rows], [r[1] for r in s_rows], _pad_id(sv))
        t_len = t_att.sum(1).astype(np.int64)
        s_len = s_att.sum(1).astype(np.int64)
        alignment = _align.align(t_ids, s_ids, amap=self.amap, teacher_vocab=tv, student_vocab=sv, texts=texts,
                                 teacher_lengths=t_len, student_lengths=s_len, byte_queries=self.byte_queries,
                                 threads=self.threads)
        out = {
            "teacher_input_ids": t_ids.astype(np.int64), "teacher_attention_mask": t_att,
            "teacher_loss_mask": t_loss,
            "student_input_ids": s_ids.astype(np.int64), "student_attention_mask": s_att,
            "student_loss_mask": s_loss,
        }
        if self.return_tensors == "pt":
            import torch
            out = {k: torch.from_numpy(v) for k, v in out.items()}
            out["teacher_attention_mask"] = out["teacher_attention_mask"].long()
            out["student_attention_mask"] = out["student_attention_mask"].long()
            out["teacher_loss_mask"] = out["teacher_loss_mask"].bool()
            out["student_loss_mask"] = out["student_loss_mask"].bool()
        else:
            alignment = _alignment_numpy(alignment)
        out["alignment"] = alignment
        out["texts"] = texts
        out["response_start"] = starts
        return out

    def report(self, batch: dict):
        """The alignment report of a collated batch over its student loss mask
        (:meth:`ctalign.align.Alignment.report`: token counts and, with a map, the share of student
        targets that are exact)."""
        return batch["alignment"].report(self.amap, student_mask=batch.get("student_loss_mask"))

    # -- helpers ---------------------------------------------------------------------------------
    def _too_long(self, nt: int, ns: int) -> bool:
        mt, ms = self.max_length
        return (mt is not None and nt > mt) or (ms is not None and ns > ms)

    @staticmethod
    def _pad(rows, masks, pad_id):
        B = len(rows)
        L = max(1, max(len(r) for r in rows))
        ids = np.full((B, L), pad_id, dtype=np.int64)
        att = np.zeros((B, L), dtype=np.int64)
        loss = np.zeros((B, L), dtype=bool)
        for b, (r, m) in enumerate(zip(rows, masks)):
            ids[b, : len(r)] = r
            att[b, : len(r)] = 1
            loss[b, : len(m)] = np.asarray(m, dtype=bool)
        return ids, att, loss

    def _truncate(self, ex: Example, t_ids, t_mask, s_ids, s_mask):
        """Cuts the text at the last common token boundary that keeps both sides within max_length."""
        tv, sv = self.teacher_vocab, self.student_vocab
        text = ex.text
        t_start, t_end, _ = (x[0] for x in _align.token_spans(tv, [t_ids], None, [text]))
        s_start, s_end, _ = (x[0] for x in _align.token_spans(sv, [s_ids], None, [text]))
        mt = self.max_length[0] or len(t_ids)
        ms = self.max_length[1] or len(s_ids)
        t_role = _align.role_codes(tv)[np.asarray(t_ids, dtype=np.int64)]
        s_role = _align.role_codes(sv)[np.asarray(s_ids, dtype=np.int64)]

        def keep_upto(start, end, role, pos):
            # tokens whose bytes end at or before pos (specials: those before the first token past pos)
            n = 0
            for j in range(len(start)):
                if end[j] > pos or (role[j] == _align.ROLE_CODES["eos"] and start[j] >= pos):
                    break
                n += 1
            return n

        tb = text.encode("utf-8")
        char_ok = np.ones(len(tb) + 1, dtype=bool)
        char_ok[:-1] = (np.frombuffer(tb, dtype=np.uint8) & 0xC0) != 0x80
        common = (set(int(e) for e in t_end) & set(int(e) for e in s_end)) | {0}
        cands = sorted(pos for pos in common if char_ok[pos])
        # The kept token counts grow with pos, so "both sides fit" holds up to some boundary and not
        # after: binary search for the last boundary that fits (O(T log T), not O(T^2)).
        best, lo, hi = None, 0, len(cands) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            nt = keep_upto(t_start, t_end, t_role, cands[mid])
            ns = keep_upto(s_start, s_end, s_role, cands[mid])
            if nt <= mt and ns <= ms:
                best, lo = (cands[mid], nt, ns), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise ValueError("cannot truncate: no common boundary keeps both sides within max_length")
        pos, nt, ns = best
        return t_ids[:nt], t_mask[:nt], s_ids[:ns], s_mask[:ns], tb[:pos].decode("utf-8")


def _alignment_numpy(a):
    kw = {}
    for k, v in a.as_dict().items():
        kw[k] = v.numpy() if hasattr(v, "numpy") else v
    return type(a)(**kw)
