"""Online input transforms applied to a linear layer's activations before they are quantized.

Each transform is an ``nn.Module`` that maps ``x [..., in]`` to ``x' [..., in]`` and is registered
by ``kind`` so a saved artifact can rebuild it from ``config()`` (its tensors travel in the state
dict). The matching inverse is folded into the layer's weight by the method that installs it, so
``linear(x) == quant_linear(x)`` holds in floating point.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

_TRANSFORMS: dict[str, type["InputTransform"]] = {}


class InputTransform(nn.Module):
    kind: ClassVar[str]

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "InputTransform":
        raise NotImplementedError

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``[in, in]`` matrix T with ``forward(x) == x @ T`` (for tests and folding)."""
        n = int(self.config()["size"])
        return self.forward(torch.eye(n, dtype=dtype)).to(dtype)


def register_transform(cls: type[InputTransform]) -> type[InputTransform]:
    _TRANSFORMS[cls.kind] = cls
    return cls


def build_transform(config: dict[str, Any]) -> InputTransform:
    import quant.transforms  # noqa: F401  (registers the built-in transforms)

    kind = config["kind"]
    if kind not in _TRANSFORMS:
        raise KeyError(f"unknown transform kind {kind!r}; known: {sorted(_TRANSFORMS)}")
    return _TRANSFORMS[kind].from_config(config)
