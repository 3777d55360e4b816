"""Cross-tokenizer distillation losses: ULD, BLD (+ ByteHead), likelihood scoring, ALM, BPM, ESCD,
strict-alignment KD (+ row masks against whitespace collapse: ``row_masks``); ``fused``: the same
losses from the student's last hidden states and output layer (``*_from_hidden``, ``FusedStudentHead``),
never materialising its ``[B, L, V]`` logits.

Every loss is an ``nn.Module`` with a functional twin (``uld_loss``, ``byte_level_distillation_loss``,
``likelihood_distillation_loss``, ``alm_loss``). Definitions: ``docs/design.md``.
One module per method (``uld``, ``bld``, ``likelihood``, ``alm``) over ``_common``.

Conventions shared by all of them
---------------------------------
* Logits are what the models return, unshifted: ``[B, L, W]`` with ``W >= vocabulary size`` (the
  padding columns of a padded output layer are ignored). Row ``j`` predicts token ``j + 1``.
* Masks are per *token*: ``student_mask[b, j]`` (``teacher_mask[b, k]``) says token ``j`` is a
  training target (e.g. a response token); it should also be 0 on padding. Token 0 is never a target
  (nothing predicts it). ``None``: every token within the alignment's lengths (or every token).
* ``temperature`` ``T`` divides the logits of both models in the distillation terms (no ``T**2``
  factor); the cross-entropy terms use ``T = 1``.
* Gradients flow to the student side only: teacher outputs are detached.
* ``reduction``: ``'none'`` gives per-student-token losses ``[B, Ls]`` (per chunk ``[B, C]`` for
  ALM), zero where nothing is counted, with the loss weights applied; ``'sum'`` is their sum;
  ``'mean'`` averages each term over the positions where that term is defined (tokens for CE,
  aligned pairs for ULD, bytes for BLD, target positions for KL, chunks for ALM) and adds the
  weighted averages. A term with no position (all masked, empty sequences) contributes a well-defined
  zero that is still connected to the graph (``loss.backward()`` works; DDP sees every parameter).
  Never NaN for finite inputs.
* Distributed data parallel: the losses hold no global state and work unchanged under DDP. With
  ``reduction='mean'`` each rank averages over its own positions (DDP then averages the ranks' means).
  ``reduction='global_mean'`` divides each term by its position count summed over the ranks of the
  default process group (one ``all_reduce`` of a few counts; every rank must call the loss) and
  multiplies by the world size, so that DDP's gradient averaging yields exactly the gradient of the
  mean over the whole global batch, as a single process would compute it. Without a process group
  it equals ``'mean'``.
"""
from __future__ import annotations

from ctalign.losses._common import cross_entropy  # noqa: F401
from ctalign.losses.uld import (uld_loss, ULDLoss)  # noqa: F401
from ctalign.losses.bld import (END_BYTE, ByteHead, token_byte_targets, byte_level_distillation_loss,
                                ByteLevelDistillationLoss, byte_targets)  # noqa: F401
from ctalign.losses.likelihood import (LikelihoodTargets, likelihood_targets, likelihood_distillation_loss,
                                       LikelihoodDistillationLoss, exact_share)  # noqa: F401
from ctalign.losses.alm import (boundary_token_mask, chunk_logprobs, alm_loss,
                                ApproximateLikelihoodMatchingLoss)  # noqa: F401
from ctalign.losses.bpm import BPMTargets, bpm_targets, bpm_loss, BPMLoss  # noqa: F401
from ctalign.losses.escd import ESCDChild, escd_child_term, escd_loss, ESCDLoss  # noqa: F401
from ctalign.losses.strict_kd import strict_positions, strict_kd_loss, StrictAlignmentKDLoss  # noqa: F401
from ctalign.losses.row_masks import whitespace_tokens, whitespace_row_mask, combine_row_masks  # noqa: F401
from ctalign.losses.fused import (LMHead, FusedStudentHead, cross_entropy_from_hidden, likelihood_loss_from_hidden,
                                  bpm_loss_from_hidden, escd_loss_from_hidden, strict_kd_loss_from_hidden,
                                  uld_loss_from_hidden, bld_loss_from_hidden)  # noqa: F401

__all__ = [
    "ULDLoss", "uld_loss", "ByteHead", "ByteLevelDistillationLoss", "byte_level_distillation_loss",
    "LikelihoodDistillationLoss", "likelihood_distillation_loss", "likelihood_targets", "exact_share",
    "ApproximateLikelihoodMatchingLoss", "alm_loss", "chunk_logprobs", "token_byte_targets",
    "boundary_token_mask", "cross_entropy", "byte_targets",
    "BPMLoss", "bpm_loss", "bpm_targets", "BPMTargets", "ESCDLoss", "escd_loss", "escd_child_term", "ESCDChild",
    "StrictAlignmentKDLoss", "strict_kd_loss", "strict_positions", "whitespace_tokens", "whitespace_row_mask",
    "combine_row_masks",
    "LMHead", "FusedStudentHead", "cross_entropy_from_hidden", "likelihood_loss_from_hidden", "bpm_loss_from_hidden",
    "escd_loss_from_hidden", "strict_kd_loss_from_hidden", "uld_loss_from_hidden", "bld_loss_from_hidden",
]
