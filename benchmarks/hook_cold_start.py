"""Why a lorapro.attach hook costs tens of microseconds on the CPU: the cold start of each kernel.

A hook runs right after backward's large matmuls. This times the four products of one A-factor
hook (r = 8, n = 384, as in MiniLM) back to back, and each time right after a large matmul
(or after touching 8 MB of memory, or after a 1 ms sleep), in one process:

    python benchmarks/hook_cold_start.py
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    torch.set_num_threads(2)
    r, n = 8, 384
    big_a, big_b, big_out = torch.randn(1024, 384), torch.randn(384, 1536), torch.empty(1024, 1536)
    memory = torch.randn(2 * 1024 * 1024)  # 8 MB
    A, g = torch.randn(r, n), torch.randn(r, n)
    x_op, pinv_b = torch.randn(r * r, r * r), torch.randn(r, r)

    def hook_products() -> torch.Tensor:  # what _adjusted_A computes
        rhs = torch.mm(g, A.mT)
        x = torch.mm(x_op, rhs.view(-1, 1)).view(r, r)
        return torch.mm(x, A).addmm_(pinv_b, g)

    before = {
        "back to back": lambda: None,
        "after a 1024x384x1536 matmul": lambda: torch.mm(big_a, big_b, out=big_out),
        "after touching 8 MB": lambda: memory.add_(1.0),
        "after a 1 ms sleep": lambda: time.sleep(0.001),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the four products of one hook:")
    for name, prepare in before.items():
        total = 0.0
        for _ in range(300):
            prepare()
            start = time.perf_counter()
            hook_products()
            total += time.perf_counter() - start
        print(f"  {name}: {total / 300 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
