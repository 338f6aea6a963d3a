"""Peak-memory sampling of benchmark runs."""

from __future__ import annotations

import time

import pytest
import torch

from lorapro.bench.memory import PeakMemory, rss_bytes


@pytest.mark.skipif(rss_bytes() is None, reason="needs /proc/self/statm (Linux)")
def test_peak_sees_a_transient_allocation_that_is_freed_before_exit():
    size = 256 * 2**20
    with PeakMemory("cpu", interval=0.01) as peak:
        block = torch.ones(size // 4)  # touched pages count in the resident set
        time.sleep(0.2)  # several sampling intervals
        del block
    assert peak.kind == "cpu-rss-sampled"
    assert peak.peak_bytes - peak.start_bytes >= 0.9 * size
    # After the block is freed the resident set drops again, but the peak keeps it.
    assert rss_bytes() < peak.peak_bytes
