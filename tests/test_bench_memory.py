"""Peak-memory measurement of benchmark runs: no test here waits on a thread or a clock."""

from __future__ import annotations

import mmap

import pytest

from lorapro.bench.memory import PeakMemory, reset_rss_peak, rss_bytes


@pytest.mark.skipif(not reset_rss_peak(), reason="needs Linux's /proc/self/clear_refs and VmHWM")
def test_peak_sees_a_transient_allocation_that_is_freed_before_exit():
    """The kernel's high-water mark, reset at the start: exact, whatever the scheduler does."""
    size = 256 * 2**20
    with PeakMemory("cpu") as peak:
        # Fresh anonymous pages from the kernel, touched one by one, then unmapped. A tensor would
        # do only on a fresh heap: late in a long test process the allocator can serve it from
        # memory that is already resident, and the resident set does not grow at all.
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        block.close()
    assert peak.kind == "cpu-rss-peak"
    assert peak.peak_bytes - peak.start_bytes >= 0.9 * size
    # After the block is freed the resident set drops again, but the peak keeps it.
    assert rss_bytes() < peak.peak_bytes


def test_sampled_fallback_keeps_the_largest_sample():
    """Where the kernel's peak cannot be reset, samples of the resident set are taken; the peak is
    the largest of the start, every sample and the end. Samples are fed here by hand (the sampling
    thread waits an hour, so it takes none), so the test does not depend on scheduling."""
    values = iter([100, 500, 200, 150])
    with PeakMemory("cpu", interval=3600.0, sample=lambda: next(values), kernel_peak=False) as peak:
        peak._record()
        peak._record()
    assert peak.kind == "cpu-rss-sampled"
    assert (peak.start_bytes, peak.peak_bytes) == (100, 500)
