"""Types the ops share: :class:`TopK` sparse rows and the accepted logits dtypes."""
from __future__ import annotations

from typing import NamedTuple

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class TopK(NamedTuple):
    """Sparse teacher rows: the ``k`` kept token ids of each row and their log-probabilities.

    ``indices``: int64 (or int32) ``[..., k]``, distinct per row, each ``< len(vocabulary)``;
    ``logprobs``: float ``[..., k]`` on the same device, used as given (the missing tail is not
    renormalised; ``-inf`` entries are allowed and count as zero mass). Every op accepts a ``TopK``
    in place of dense logits and then costs O(k log k) per row plus the output size.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
