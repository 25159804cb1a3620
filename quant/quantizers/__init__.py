from quant.quantizers.core import QParams, compute_qparams, dequantize_codes, fake_quantize, quantize_codes, round_ste
from quant.quantizers.packing import pack_codes, pack_int4, unpack_codes, unpack_int4

__all__ = [
    "QParams",
    "compute_qparams",
    "dequantize_codes",
    "fake_quantize",
    "pack_codes",
    "pack_int4",
    "quantize_codes",
    "round_ste",
    "unpack_codes",
    "unpack_int4",
]
