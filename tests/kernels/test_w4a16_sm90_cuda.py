"""GPU checks of the Hopper W4A16 GEMM (kernels/csrc/w4a16_sm90.cuh: CUTLASS mixed-input wgmma, stream-K scheduler)
against the float64 reference on fresh random inputs, outputs poisoned first. Error bound as the other W4A16 kernels
(METHOD.md: ||out - ref|| / ||ref|| < 2e-3; the fp16-rounded scale adds ~2e-4)."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import poison_cuda, rel_err, w4a16_case

import kernels
from kernels import reference
from quant.quantizers.packing import pack_int4

pytestmark = pytest.mark.gpu  # collected only where CUDA is (tests/conftest.py)
DEV = "cuda"


@pytest.fixture(autouse=True)
def _extension_built() -> None:
    assert kernels.available(), kernels.unavailable_reason()
    assert int(kernels._ext.extension().w4a16_sm90_num_configs()) == 7, "built without CUTLASS"


def _operands(qw: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    codes = kernels._ext.extension().w4a16_sm90_reorder(qw.to(DEV))
    s, z = reference.w4a16_sm90_operands(scale, zero)
    return codes, s.to(DEV), z.to(DEV)


@pytest.mark.parametrize("config", [-1, 0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("tokens", [1, 17, 64, 100, 257])
@pytest.mark.parametrize("k,n,group", [(4096, 1008, 128), (11008, 256, 128), (1024, 4096, 256), (256, 48, 128)])
def test_w4a16_sm90_matches_reference(config: int, tokens: int, k: int, n: int, group: int) -> None:
    """Every configuration (32 .. 256 tokens x 64 or 128 k per tile), token counts within and past one token tile, N not a
    multiple of the 128-row tile, K = 11008 (172 k tiles), groups of two k tiles and more, with bias."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(config * 31 + tokens + k + n + group)
    qw, scale, zero, bias, x, ref = w4a16_case(gen, tokens, k, n, group)
    codes, s, z = _operands(qw, scale, zero)
    poison_cuda(tokens * n * 2)
    out = ext.w4a16_gemm_sm90(x.to(DEV), codes, s, z, group, bias.to(DEV), config)
    assert out.shape == (tokens, n) and out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-3
    # and it is the documented arithmetic (fp16 scale and zero term), closer still
    sm90_ref = reference.w4a16_gemm_sm90_ref(x.double(), qw, s.cpu(), z.cpu(), group, bias)
    assert rel_err(out, sm90_ref) < 1e-3


@pytest.mark.parametrize("splits", [-1, 1, 2, 3, 7])
@pytest.mark.parametrize("config", [0, 2, 5])
def test_w4a16_sm90_decompositions(splits: int, config: int) -> None:
    """Data-parallel, split-K (also uneven: 7 slices of 64 k tiles) and CUTLASS's stream-K heuristic give the reference
    result, without bias; bad arguments are refused with the argument named."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(splits * 7 + config)
    k, n, group, tokens = 4096, 2048, 128, 48
    qw, scale, zero, _, x, ref = w4a16_case(gen, tokens, k, n, group, with_bias=False)
    codes, s, z = _operands(qw, scale, zero)
    poison_cuda(tokens * n * 2)
    out = ext.w4a16_gemm_sm90(x.to(DEV), codes, s, z, group, None, config, splits)
    assert rel_err(out, ref) < 2e-3
    with pytest.raises(RuntimeError, match="splits"):
        ext.w4a16_gemm_sm90(x.to(DEV), codes, s, z, group, None, config, 0)
    with pytest.raises(RuntimeError, match="config"):
        ext.w4a16_gemm_sm90(x.to(DEV), codes, s, z, group, None, 7, splits)
    with pytest.raises(RuntimeError, match="scale and zero"):
        ext.w4a16_gemm_sm90(x.to(DEV), codes, s[:, :-16].contiguous(), z, group, None, config, splits)
    with pytest.raises(RuntimeError, match="multiple"):
        ext.w4a16_gemm_sm90(x.to(DEV), codes[:-8].contiguous(), s, z, group, None, config, splits)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 256), (1008, 4096), (256, 11008)])
def test_w4a16_sm90_reorder_matches_reference(n: int, k: int) -> None:
    """The CUDA reordering (one thread per code, CuTe's layout) is exactly reference.pack_w4_sm90 (the layout written
    out by hand), and the qaas ops route to the extension on CUDA."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(n + k)
    qw = pack_int4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
    expect = reference.pack_w4_sm90(qw)
    assert torch.equal(ext.w4a16_sm90_reorder(qw.to(DEV)).cpu(), expect)
    assert torch.equal(torch.ops.qaas.w4a16_sm90_reorder(qw.to(DEV)).cpu(), expect)
    with pytest.raises(RuntimeError, match="multiple of 16 and K of 64"):
        ext.w4a16_sm90_reorder(qw[:, : k // 2 - 8].contiguous().to(DEV))  # K - 16


def test_w4a16_sm90_op_on_cuda_is_the_extension() -> None:
    """torch.ops.qaas.w4a16_gemm_sm90 on CUDA tensors is the extension's default call, and its CPU reference agrees."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(3)
    qw, scale, zero, bias, x, _ = w4a16_case(gen, 40, 512, 256, 128)
    codes, s, z = _operands(qw, scale, zero)
    out = torch.ops.qaas.w4a16_gemm_sm90(x.to(DEV), codes, s, z, 128, bias.to(DEV))
    assert torch.equal(out, ext.w4a16_gemm_sm90(x.to(DEV), codes, s, z, 128, bias.to(DEV)))
    cpu = torch.ops.qaas.w4a16_gemm_sm90(x.float(), codes.cpu(), s.cpu(), z.cpu(), 128, bias)
    assert rel_err(out, cpu) < 1e-3


@pytest.mark.parametrize("tokens", [20, 64, 300, 600])
def test_w4a16_sm90_groups_of_64(tokens: int) -> None:
    """Groups of 64 (one k tile of 64 each) run on the k-64 configurations by default at every token count; the k-128
    configurations refuse them, naming the group size."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(tokens)
    k, n, group = 1024, 256, 64
    qw, scale, zero, bias, x, ref = w4a16_case(gen, tokens, k, n, group)
    codes, s, z = _operands(qw, scale, zero)
    poison_cuda(tokens * n * 2)
    out = ext.w4a16_gemm_sm90(x.to(DEV), codes, s, z, group, bias.to(DEV))
    assert rel_err(out, ref) < 2e-3
    with pytest.raises(RuntimeError, match="group_size"):
        ext.w4a16_gemm_sm90(x.to(DEV), codes, s, z, group, bias.to(DEV), 5)
