"""Interleaved timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import timeit
from typing import Callable


def interleaved(methods: dict[str, Callable[[], object]], number: int, rounds: int) -> dict[str, dict]:
    """Times every method `rounds` times, one round of all methods after another,
    so that noise on this shared machine hits them alike.  Returns per method
    the median ns per call and the (min, max) spread."""
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method, fn in methods.items():
            samples[method].append(timeit.timeit(fn, number=number) / number * 1e9)
    return {m: {"ns": statistics.median(s), "min": min(s), "max": max(s)} for m, s in samples.items()}
