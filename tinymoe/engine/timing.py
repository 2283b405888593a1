"""Timing helpers: a wall clock, summary statistics, peak memory."""

import resource
import statistics
import sys
import time

import torch


def now() -> float:
    return time.perf_counter()


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """mean / p50 / p90 of a list of durations in seconds, reported in milliseconds."""
    if not seconds:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan")}
    ms = [s * 1e3 for s in seconds]
    return {"mean": statistics.fmean(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90)}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
