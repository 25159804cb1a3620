"""Drive the W4A16 decode kernel for a profiler (``ncu ... python3 -m kernels.profile_w4a16``):
LLaMA-7B MLP up-projection shape (K 4096, N 11008), 1 token, fresh random int4 weights."""

from __future__ import annotations

import torch

import kernels
from quant.quantizers.packing import pack_int4


def main() -> None:
    assert kernels.available(), kernels.unavailable_reason()
    ext = kernels._ext.extension()
    k, n, group = 4096, 11008, 128
    gen = torch.Generator().manual_seed(0)
    qw = pack_int4(torch.randint(1, 16, (n, k), generator=gen, dtype=torch.uint8)).cuda()
    scale = (torch.rand(n, k // group, generator=gen) * 0.01).cuda()
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float().cuda()
    x = torch.randn(1, k, generator=gen).half().cuda()
    for _ in range(5):
        ext.w4a16_gemm(x, qw, scale, zero, group, None)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
