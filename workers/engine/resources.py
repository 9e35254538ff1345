"""Peak memory of a block of work: process RSS sampled in a thread, plus CUDA's own peak."""

from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """Context manager recording peak resident memory (and peak CUDA memory when present)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss = 0
        self.peak_cuda = 0

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self.peak_rss = psutil.Process().memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)
        if torch.cuda.is_available():
            self.peak_cuda = torch.cuda.max_memory_allocated()

    def summary(self) -> dict[str, float]:
        out = {"peak_rss_mib": round(self.peak_rss / 2**20, 1)}
        if self.peak_cuda:
            out["peak_cuda_mib"] = round(self.peak_cuda / 2**20, 1)
        return out
