"""QuantLinear: the quantized replacement for ``nn.Linear``.

It stores real integer weights (int4 packed two per byte, or int8/int6 one per byte) with per-group
scales and zero points, an optional online input transform (Hadamard / Kronecker affine), and the
activation-quantization settings (bits, symmetric, learned clip ratio). The reference forward runs
anywhere (CPU): transform -> per-token fake-quant -> matmul with the dequantized weight. On CUDA,
when the ``kernels`` extension is built, ``forward`` dispatches to the fused kernels instead
(``kernels.dispatch.quant_linear_forward``), which compute the same function.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant.quantizers.core import fake_quantize
from quant.quantizers.packing import pack_codes, tile_int4_rows, unpack_codes, untile_int4_rows
from quant.quantizers.weight import QuantizedWeight
from quant.recipes.schema import FP_BITS, ActivationQuantSpec
from quant.transforms.base import InputTransform, build_transform


def tensor_stamp(t: torch.Tensor) -> tuple[int, int]:
    """(data_ptr, in-place version) of a tensor: equal stamps mean the same, unmodified tensor. Inference tensors (made
    under ``torch.inference_mode``) track no version (-1: their identity alone)."""
    return t.data_ptr(), -1 if t.is_inference() else t._version


def _kernel_dispatch():
    try:
        from kernels import dispatch  # optional: built CUDA extension
    except ImportError:
        return None
    return dispatch


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_bits: int,
        group_size: int,
        act_bits: int = FP_BITS,
        act_symmetric: bool = True,
        act_clip_ratio: float = 1.0,
        transform: InputTransform | None = None,
        weight_symmetric: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.group_size = group_size
        self.weight_symmetric = weight_symmetric
        self.act_bits = act_bits
        self.act_symmetric = act_symmetric
        self.transform = transform
        n_groups = in_features // group_size
        if weight_bits < FP_BITS:
            packed_cols = in_features // 2 if weight_bits <= 4 else in_features
            self.register_buffer("qweight", torch.zeros(out_features, packed_cols, dtype=torch.uint8))
            self.register_buffer("w_scale", torch.ones(out_features, n_groups, dtype=torch.float32))
            self.register_buffer("w_zero", torch.zeros(out_features, n_groups, dtype=torch.float32))
        else:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("act_clip", torch.tensor(float(act_clip_ratio)))
        self._dequant_cache: torch.Tensor | None = None
        # tensor_stamp(qweight) when it was put into the decode kernels' tiled order (tile_codes); None while it holds
        # rows. A write into that tensor since (its version moved) means the rows were written back.
        self._tiled_at: tuple[int, int] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "qweight":  # a new codes tensor holds rows
            self.__dict__["_tiled_at"] = None
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(
        cls,
        qweight: QuantizedWeight | torch.Tensor,
        bias: torch.Tensor | None,
        act: ActivationQuantSpec,
        transform: InputTransform | None = None,
        act_clip_ratio: float | None = None,
        weight_symmetric: bool = True,
    ) -> "QuantLinear":
        """Build from a quantized weight (or a float weight, kept in FP when weights are not quantized)."""
        if isinstance(qweight, QuantizedWeight):
            out_f, in_f = qweight.codes.shape
            bits, g = qweight.bits, qweight.group_size
        else:
            out_f, in_f = qweight.shape
            bits, g = FP_BITS, in_f
        layer = cls(
            in_f,
            out_f,
            bias is not None,
            weight_bits=bits,
            group_size=g,
            act_bits=act.bits if act.enabled else FP_BITS,
            act_symmetric=act.symmetric,
            act_clip_ratio=act.clip_ratio if act_clip_ratio is None else act_clip_ratio,
            transform=transform,
            weight_symmetric=weight_symmetric,
        )
        with torch.no_grad():
            if isinstance(qweight, QuantizedWeight):
                layer.qweight.copy_(pack_codes(qweight.codes, bits))
                layer.w_scale.copy_(qweight.scale)
                layer.w_zero.copy_(qweight.zero)
            else:
                layer.weight.copy_(qweight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # ------------------------------------------------------------------ weights
    def tileable(self) -> bool:
        """Whether ``qweight`` can take the W4A16 decode kernels' tiled order in place: codes of at most 4 bits (two
        per byte), K a multiple of 128 and N of 16 (the tiled tensor then has the same shape)."""
        return (self.weight_bits <= 4 and hasattr(self, "qweight") and self.in_features % 128 == 0
                and self.out_features % 16 == 0)

    @property
    def codes_tiled(self) -> bool:
        """True while ``qweight`` holds the tiled order of ``quant.quantizers.packing.tile_int4_rows`` (set by
        :meth:`tile_codes`; carried through ``.to()`` and copies; dropped when the codes are written: a state dict
        loaded, ``qweight`` replaced or written in place)."""
        if self._tiled_at is None:
            return False
        q = self.qweight
        if q.data_ptr() != self._tiled_at[0]:  # moved or copied with its bytes: the same order, a new tensor
            self._tiled_at = tensor_stamp(q)
        elif tensor_stamp(q)[1] != self._tiled_at[1]:  # written in place since: rows again
            self._tiled_at = None
        return self._tiled_at is not None

    @torch.no_grad()
    def tile_codes(self) -> bool:
        """Put ``qweight`` into the W4A16 decode kernels' tiled order, in place (each 16-byte load of the kernel then
        covers whole 128-byte lines: ~4-9% faster decode on an H200, benchmarks/RESULTS.md v11). The module's
        interface keeps meaning rows: :meth:`packed_codes`, :meth:`weight_codes` and the state dict give them back.
        False (nothing changed) where the layer is not :meth:`tileable`."""
        if self.codes_tiled:
            return True
        if not self.tileable() or (self.qweight.is_inference() and not torch.is_inference_mode_enabled()):
            return False  # (an inference tensor can only be written inside inference mode)
        self.qweight.copy_(tile_int4_rows(self.qweight))
        self._tiled_at = tensor_stamp(self.qweight)
        return True

    def packed_codes(self) -> torch.Tensor:
        """The packed codes in row order (``[N, K/2]`` for <= 4 bits), whatever order ``qweight`` holds."""
        if self.codes_tiled:
            return untile_int4_rows(self.qweight, self.out_features)
        return self.qweight

    def weight_codes(self) -> torch.Tensor:
        return unpack_codes(self.packed_codes(), self.weight_bits)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.weight_bits >= FP_BITS:
            return self.weight.to(dtype)
        u = self.weight_codes().float().reshape(self.out_features, -1, self.group_size)
        w = (u - self.w_zero.unsqueeze(-1)) * self.w_scale.unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def _cached_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        cache = self._dequant_cache
        if cache is None or cache.dtype != dtype or cache.device != device:
            # detached: for 16-bit weights ``.to`` may return the Parameter itself, and assigning a
            # Parameter to an attribute would register it (an extra "_dequant_cache" state-dict key)
            cache = self.dequantized_weight(dtype).detach().to(device)
            self._dequant_cache = cache
        return cache

    def invalidate_cache(self) -> None:
        self._dequant_cache = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._dequant_cache = None
        self._tiled_at = None  # the loaded codes are rows
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.codes_tiled:  # artifacts hold rows, whatever order a decode left in qweight
            destination[prefix + "qweight"] = self.packed_codes().detach()

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda()/.half(): drop the dequantized cache
        self._dequant_cache = None
        tiled = self.codes_tiled
        out = super()._apply(fn, recurse)
        if tiled:  # the bytes moved as they were: still tiled, in the new tensor
            self._tiled_at = tensor_stamp(self.qweight)
        return out

    # ------------------------------------------------------------------ forward
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Online transform + per-token activation fake-quant (the reference of the fused kernel)."""
        if self.transform is not None:
            x = self.transform(x)
        if self.act_bits < FP_BITS:
            x = fake_quantize(x, self.act_bits, self.act_symmetric, self.act_clip)
        return x

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantize_input(x)
        w = self._cached_weight(xq.dtype, xq.device)
        bias = None if self.bias is None else self.bias.to(xq.dtype)
        return F.linear(xq, w, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            dispatch = _kernel_dispatch()
            if dispatch is not None and dispatch.supports(self, x):
                return dispatch.quant_linear_forward(self, x)
        return self.reference_forward(x)

    # ------------------------------------------------------------------ (de)serialisation
    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight_bits": self.weight_bits,
            "group_size": self.group_size,
            "weight_symmetric": self.weight_symmetric,
            "act_bits": self.act_bits,
            "act_symmetric": self.act_symmetric,
            "transform": None if self.transform is None else self.transform.config(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantLinear":
        cfg = dict(config)
        t = cfg.pop("transform")
        return cls(**cfg, transform=None if t is None else build_transform(t))

    def extra_repr(self) -> str:
        t = "none" if self.transform is None else self.transform.kind
        return (
            f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}"
            f"(g{self.group_size}) A{self.act_bits}, transform={t}"
        )


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
