from __future__ import annotations

import pytest
import torch

from quant.quantizers.packing import pack_codes, pack_int4, unpack_codes, unpack_int4


def test_int4_round_trip_and_layout() -> None:
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (5, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # element 2j in the LOW nibble of byte j, element 2j+1 in the HIGH nibble
    assert int(pack_int4(torch.tensor([[3, 10]], dtype=torch.uint8))[0, 0]) == 3 | (10 << 4)


def test_int4_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError):
        pack_int4(torch.full((1, 2), 16, dtype=torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pack_codes_by_bits(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (4, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape[-1] == (8 if bits <= 4 else 16)
    assert torch.equal(unpack_codes(packed, bits), codes)
    with pytest.raises(ValueError):
        pack_codes(codes, 16)
