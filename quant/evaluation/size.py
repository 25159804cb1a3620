"""Model size: bytes of the tensors a saved model holds (parameters and persistent buffers)."""

from __future__ import annotations

from pydantic import BaseModel
from torch import nn


class SizeReport(BaseModel):
    size_bytes_fp: int
    size_bytes_quant: int

    @property
    def compression(self) -> float:
        return self.size_bytes_fp / max(1, self.size_bytes_quant)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the state dict, each shared storage counted once (tied embeddings)."""
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key in seen and tensor.numel() > 0:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def size_report(fp_model: nn.Module, q_model: nn.Module) -> SizeReport:
    return SizeReport(size_bytes_fp=model_size_bytes(fp_model), size_bytes_quant=model_size_bytes(q_model))
