"""Timing and memory probes: medians with inter-quartile ranges over repeats after a warm-up
(CUDA events on a GPU), and the peak resident set of this process.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable




@dataclass
class Timing:
    """Median and inter-quartile range of repeated timings, in seconds per call."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Timing":
        if not samples:
            raise ValueError("no timing samples")
        s = sorted(samples)
        if len(s) == 1:
            return cls(s[0], s[0], s[0], 1)
        q = statistics.quantiles(s, n=4, method="inclusive")
        return cls(statistics.median(s), q[0], q[2], len(s))

    def as_dict(self) -> dict:
        return {"time_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "n": self.n}


def call_timed(fn: Callable[[], Any], *, cuda: bool = False) -> tuple[Any, float]:
    """One call of ``fn``: (its output, seconds), synchronised on CUDA."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(fn: Callable[[], Any], *, cuda: bool = False, target_s: float = 0.5, min_reps: int = 3,
            max_reps: int = 100, slow_s: float = 2.0, first_s: float | None = None) -> Timing:
    """Time ``fn``: one warm-up call, then repeats until about ``target_s`` (median, IQR).

    ``first_s``: the caller already made the warm-up call, which took that long. A warm-up slower
    than ``slow_s`` counts as the only sample (big dense baselines, slow pure-torch paths): timing
    them again would say little more at a high price. Calls faster than 1 ms are batched so each
    sample is about 1 ms. On CUDA each sample is bracketed by CUDA events on the current stream.
    """
    import torch

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        first = first_s if first_s is not None else call_timed(fn, cuda=cuda)[1]
        if first >= slow_s:
            return Timing.from_samples([first])
        inner = max(1, min(1000, int(1e-3 / max(first, 1e-7))))
        reps = max(min_reps, min(max_reps, int(target_s / max(first * inner, 1e-7))))
        samples = []
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(reps):
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e-3 / inner)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t0) / inner)
        return Timing.from_samples(samples)
    finally:
        if gc_was_enabled:
            gc.enable()


def _rss_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so it records the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
