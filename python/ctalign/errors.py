"""Exception types of the ctalign package.

Every error that reports bad input (a missing or malformed file, a map built for other tokenizers,
an unknown tokenizer format) derives from :class:`CtalignError`, itself a :class:`ValueError`, so
callers may catch either. The command line turns these into one line on stderr and exit status 2.
"""
from __future__ import annotations

__all__ = ["CtalignError", "ArtifactError", "MapMismatchError", "NonFiniteLogitsError", "VocabError"]


class CtalignError(ValueError):
    """Base class of the package's bad-input errors."""


class ArtifactError(CtalignError):
    """A saved alignment map cannot be read: missing, truncated, corrupt, wrong magic or version."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MapMismatchError(CtalignError):
    """An alignment map was built for other tokenizers than the ones given."""


class VocabError(CtalignError):
    """A tokenizer file cannot be loaded (unknown format, malformed content)."""


class NonFiniteLogitsError(CtalignError):
    """A logits row holds NaN or infinite values (or overflows at the temperature). ``row``: its index
    among the logits rows flattened to ``[N, W]``."""

    def __init__(self, message: str, row: int):
        self.row = int(row)
        super().__init__(message)
