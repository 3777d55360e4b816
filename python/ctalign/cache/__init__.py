"""The offline teacher cache: run the teacher once, store its top-k rows compactly, train from them.

    >>> from ctalign import cache
    >>> cache.cache_teacher("smollm2.gguf", "train.jsonl", "cache/", top_k=64)        # doctest: +SKIP
    >>> data = cache.TeacherCache("cache/")                                            # doctest: +SKIP
    >>> collate = cache.CachedDistillationCollator(amap, cache=data, max_length=512)  # doctest: +SKIP
    >>> batch = collate([data[0], data[1]])    # batch["teacher_topk"]: TopK [B, Lt, k]  # doctest: +SKIP

Modules: ``codec`` (the fixed-width row encoding and its error), ``shard`` (the memory-mapped shard
files), ``writer`` (:func:`cache_teacher`, resumable, one rank or several), ``dataset``
(:class:`TeacherCache`, :class:`CachedDistillationCollator`), ``teachers`` (callables, transformers
folders, GGUF files). ``ctalign cache-teacher`` is the command line.
"""
from __future__ import annotations

from ctalign.cache.codec import LOGPROB_CODECS, RowCodec, reconstruction_error
from ctalign.cache.dataset import CachedDistillationCollator, TeacherCache
from ctalign.cache.shard import CacheError
from ctalign.cache.writer import cache_teacher, merge_index, read_examples

__all__ = ["cache_teacher", "TeacherCache", "CachedDistillationCollator", "CacheError", "RowCodec",
           "LOGPROB_CODECS", "reconstruction_error", "merge_index", "read_examples"]
