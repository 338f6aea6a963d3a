"""Peak memory of one run, measured the same way for every method.

On CUDA this is the allocator's own peak (``torch.cuda.max_memory_allocated``, reset at the
start). On Linux CPUs it is the kernel's high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``), reset at the start by writing 5 to ``/proc/self/clear_refs``: exact, with
no sampling. Where that reset is not available, a background thread samples the resident set
size every ``interval`` seconds; a spike shorter than the interval can be missed, which the
kind ``"cpu-rss-sampled"`` tells the report.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from types import TracebackType

import torch

__all__ = ["PeakMemory", "reset_rss_peak", "rss_bytes", "rss_peak_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process, or None where /proc is unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def rss_peak_bytes() -> int | None:
    """The kernel's high-water mark of this process's resident set (``VmHWM``), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1)) * 1024


def reset_rss_peak() -> bool:
    """Reset the high-water mark to the current resident set (Linux 4.0+); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return rss_peak_bytes() is not None


class PeakMemory:
    """Context manager: ``peak_bytes``, ``start_bytes`` and ``kind`` ("cuda-allocated",
    "cpu-rss-peak" or "cpu-rss-sampled")."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        interval: float = 0.05,
        *,
        sample: Callable[[], int | None] = rss_bytes,
        kernel_peak: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self.kind = "cuda-allocated" if self.device.type == "cuda" else "cpu-rss-sampled"
        self._sample_rss = sample
        self._kernel_peak = kernel_peak
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> None:
        now = self._sample_rss()
        if now is not None and (self.peak_bytes is None or now > self.peak_bytes):
            self.peak_bytes = now

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        elif self._kernel_peak and reset_rss_peak():
            self.kind = "cpu-rss-peak"
            self.start_bytes = self.peak_bytes = rss_bytes()
        else:
            self.start_bytes = self.peak_bytes = self._sample_rss()
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
        if self.kind == "cpu-rss-peak":
            peak = rss_peak_bytes()
            if peak is not None and (self.peak_bytes is None or peak > self.peak_bytes):
                self.peak_bytes = peak
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._record()
