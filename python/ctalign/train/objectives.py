"""The training objective of ``ctalign distill``: one of the project's losses (or ``sft``), for one or
several teachers.

Every teacher contributes its loss on the same student rows, weighted: ``sum_i w_i loss_i`` with
``sum_i w_i = 1``. For the KL-type losses (``likelihood``, BLD's KL term) this has the gradient of the
same loss against the mixed target ``sum_i w_i q_i`` in the student's terms (the cross-entropy is
linear in the target; the targets' entropies are constants), so mixing losses is mixing targets; for
ULD and ALM it is the weighted mean of the per-teacher losses. BPM, ESCD and strict-alignment KD
train with the cross-entropy added at weight :data:`CE_WEIGHT` (likelihood's default), as ULD, BLD and
ALM train with theirs (1.0); ``ce_weight`` (``--ce-weight``) sets it for any loss.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

LOSSES = ("sft", "uld", "bld", "likelihood", "alm", "bpm", "escd", "strict_kd")
#: the cross-entropy weight the methods without a CE term of their own train with here (likelihood's default)
CE_WEIGHT = 0.2
#: the losses that train with a cross-entropy weight of their own (their authors' defaults)
DEFAULT_CE_WEIGHTS = {"uld": 1.0, "bld": 1.0, "alm": 1.0}
BYTE_QUERIES = 10  # K, the bytes BLD's head predicts per student token


@dataclass
class TeacherBatch:
    """What one teacher contributes to a step: its rows (dense logits or TopK), ids, masks, alignment."""

    rows: Any
    input_ids: Any
    loss_mask: Any
    alignment: Any
    own_logprob: Any = None  # cached teachers: log p of the teacher's own next token (ALM)
    amap: Any = None
    vocab: Any = None


def byte_queries_for(loss: str) -> int:
    return BYTE_QUERIES if loss == "bld" else 0


class Objective:
    """``loss(student_logits, student_hidden, student_ids, student_mask, teachers) -> scalar``."""

    def __init__(self, loss: str, student_vocab, *, temperature: float = 1.0, top_k: int | None = 64,
                 hidden_size: int | None = None, reduction: str = "mean", student_head=None,
                 ce_weight: float | None = None):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r} (known: {', '.join(LOSSES)})")
        from ctalign import losses as L
        # fused (--fused): the losses from the student's last hidden states and this output layer
        # (ctalign.losses.fused.LMHead), never its [B, L, V] logits; s_logits is then None
        self.student_head = None if student_head is None else L.LMHead.of(student_head)
        if self.student_head is not None and loss == "alm":
            raise ValueError("the alm loss has no fused form (--fused): it reads the student's chunk log-probabilities")

        self.name, self.student_vocab, self.temperature, self.top_k = loss, student_vocab, temperature, top_k
        if ce_weight is not None and not (ce_weight >= 0.0 and ce_weight < float("inf")):
            raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
        # the cross-entropy weight added to the distillation term: the loss's own unless given
        self.ce_weight = ce_weight if ce_weight is not None else DEFAULT_CE_WEIGHTS.get(loss, CE_WEIGHT)
        self.reduction = reduction  # "global_mean" under DDP: the mean over the whole global batch
        self.head = None
        if loss == "bld":
            if hidden_size is None:
                raise ValueError("the bld loss needs the student's hidden size for its byte head")
            self.head = L.ByteHead(hidden_size, num_bytes=BYTE_QUERIES)
        self._L = L

    def parameters(self):
        return list(self.head.parameters()) if self.head is not None else []

    def __call__(self, s_logits, s_hidden, s_ids, s_mask, teachers: list[tuple[float, TeacherBatch]]):
        L, Vs = self._L, len(self.student_vocab)
        if self.name == "sft" or not teachers:
            if self.student_head is not None:
                return L.cross_entropy_from_hidden(s_hidden, self.student_head, s_ids, mask=s_mask, vocab_size=Vs,
                                                   reduction=self.reduction)
            return L.cross_entropy(s_logits, s_ids, mask=s_mask, vocab_size=Vs, reduction=self.reduction)
        total = 0.0
        for weight, t in teachers:
            total = total + weight * self._one(s_logits, s_hidden, s_ids, s_mask, self._at_top_k(t))
        return total

    def _at_top_k(self, t: TeacherBatch) -> TeacherBatch:
        """A live teacher's dense logits as its ``top_k`` TopK rows: the entries a teacher cache at that k
        holds, so that ``top_k`` means the same teacher entries live and cached. ALM keeps the dense rows:
        it reads the log-probability of the teacher's own next token, which a cache stores apart."""
        from ctalign.ops import TopK, topk_logprobs
        if not self.top_k or self.name == "alm" or isinstance(t.rows, TopK):
            return t
        return replace(t, rows=topk_logprobs(t.rows, self.top_k, vocab_size=len(t.vocab)))

    def _one(self, s_logits, s_hidden, s_ids, s_mask, t: TeacherBatch):
        L, Vs, T, red = self._L, len(self.student_vocab), self.temperature, self.reduction
        Vt = len(t.vocab)
        if self.student_head is not None:
            return self._fused(s_hidden, s_ids, s_mask, t)
        if self.name == "uld":
            return L.uld_loss(s_logits, t.rows, s_ids, alignment=t.alignment, student_mask=s_mask,
                              teacher_mask=t.loss_mask, top_k=self.top_k or 256, temperature=T,
                              student_vocab_size=Vs, teacher_vocab_size=Vt, align="byte", reduction=red,
                              ce_weight=self.ce_weight)
        if self.name == "likelihood":
            return L.likelihood_distillation_loss(s_logits, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask,
                                                  temperature=T, top_k=self.top_k, reduction=red,
                                                  ce_weight=self.ce_weight)
        if self.name == "bld":
            return L.byte_level_distillation_loss(s_logits, self.head(s_hidden), t.rows, s_ids, t.alignment,
                                                  student_vocab=self.student_vocab, teacher_vocab=t.vocab,
                                                  student_mask=s_mask, temperature=T, reduction=red,
                                                  ce_weight=self.ce_weight)
        if self.name == "bpm":
            return L.bpm_loss(s_logits, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask, temperature=T,
                              ce_weight=self.ce_weight, reduction=red)
        if self.name == "escd":
            return L.escd_loss(s_logits, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask, temperature=T,
                               ce_weight=self.ce_weight, reduction=red)
        if self.name == "strict_kd":
            return L.strict_kd_loss(s_logits, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask,
                                    temperature=T, ce_weight=self.ce_weight, reduction=red)
        # alm: added to the student's own cross-entropy, as its authors train it
        ce = self.ce_weight * L.cross_entropy(s_logits, s_ids, mask=s_mask, vocab_size=Vs, reduction=red)
        rows = None if t.own_logprob is not None else t.rows
        return ce + L.alm_loss(s_logits, rows, s_ids, t.input_ids, t.alignment, student_mask=s_mask,
                               teacher_mask=t.loss_mask, temperature=T, student_vocab=self.student_vocab,
                               teacher_vocab=t.vocab, teacher_own_logprob=t.own_logprob, reduction=red)

    def _fused(self, s_hidden, s_ids, s_mask, t: TeacherBatch):
        """:meth:`_one` from the student's last hidden states and output layer (ctalign.losses.fused)."""
        L, Vs, T, red, hd = self._L, len(self.student_vocab), self.temperature, self.reduction, self.student_head
        if self.name == "uld":
            return L.uld_loss_from_hidden(s_hidden, hd, t.rows, s_ids, alignment=t.alignment, student_mask=s_mask,
                                          teacher_mask=t.loss_mask, top_k=self.top_k or 256, temperature=T,
                                          student_vocab_size=Vs, teacher_vocab_size=len(t.vocab), align="byte",
                                          reduction=red, ce_weight=self.ce_weight)
        if self.name == "likelihood":
            return L.likelihood_loss_from_hidden(s_hidden, hd, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask,
                                                 temperature=T, top_k=self.top_k, reduction=red,
                                                 ce_weight=self.ce_weight)
        if self.name == "bld":
            return L.bld_loss_from_hidden(s_hidden, hd, self.head(s_hidden), t.rows, s_ids, t.alignment,
                                          student_vocab=self.student_vocab, teacher_vocab=t.vocab, student_mask=s_mask,
                                          temperature=T, reduction=red, ce_weight=self.ce_weight)
        if self.name == "bpm":
            return L.bpm_loss_from_hidden(s_hidden, hd, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask,
                                          temperature=T, ce_weight=self.ce_weight, reduction=red)
        if self.name == "escd":
            return L.escd_loss_from_hidden(s_hidden, hd, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask,
                                           temperature=T, ce_weight=self.ce_weight, reduction=red)
        return L.strict_kd_loss_from_hidden(s_hidden, hd, t.rows, s_ids, t.alignment, t.amap, student_mask=s_mask,
                                            temperature=T, ce_weight=self.ce_weight, reduction=red)
