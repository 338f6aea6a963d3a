"""Peak memory of one run, measured the same way for every method.

On CUDA this is the allocator's own peak (``torch.cuda.max_memory_allocated``, reset at
the start). On CPU PyTorch keeps no allocator statistics and the process's high-water
mark (``ru_maxrss``) cannot be reset between runs, so a background thread samples the
resident set size every ``interval`` seconds; a spike shorter than the interval can be
missed, which the report states.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import torch

__all__ = ["PeakMemory", "rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process, or None where /proc is unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager: ``peak_bytes`` and ``kind`` ("cuda-allocated" or "cpu-rss-sampled")."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self.kind = "cuda-allocated" if self.device.type == "cuda" else "cpu-rss-sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_bytes()
            if now is not None and (self.peak_bytes is None or now > self.peak_bytes):
                self.peak_bytes = now

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = rss_bytes()
            if self.start_bytes is not None:
                self._thread = threading.Thread(target=self._sample, name="lorapro-peak-rss", daemon=True)
                self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = rss_bytes()
        if now is not None and (self.peak_bytes is None or now > self.peak_bytes):
            self.peak_bytes = now
