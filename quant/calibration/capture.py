"""Block-wise calibration support: capture the inputs of the first transformer block and
replay blocks one at a time.

Block-wise methods (GPTQ, FlatQuant, OSTQuant's block mode) need, for each block, the hidden states
that enter it plus the keyword arguments the model passes (attention mask, rotary position
embeddings, ...). ``capture_block_inputs`` runs the model on the calibration data with block 0
replaced by a recorder that stops the forward pass, so only the embeddings are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.models.adapters import ModelAdapter


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, wrapped: nn.Module, sink: "BlockInputs") -> None:
        super().__init__()
        self.wrapped = wrapped
        self.sink = sink
        # some models read attributes of their layers (e.g. attention_type) while building masks
        for attr in ("attention_type", "layer_idx"):
            if hasattr(wrapped, attr):
                setattr(self, attr, getattr(wrapped, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.sink.hidden.append(hidden_states.detach())
        if args:
            kwargs = dict(kwargs)
            kwargs["__args__"] = args
        self.sink.kwargs.append({k: v for k, v in kwargs.items()})
        raise _StopForward


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering a block and the kwargs the model passes."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    kw = dict(kwargs)
    args = kw.pop("__args__", ())
    kw["use_cache"] = False
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    return _block_output(block(hidden, *args, **kw))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: ModelAdapter, calibration: CalibrationData, device: torch.device | str | None = None
) -> BlockInputs:
    sink = BlockInputs()
    blocks = adapter.blocks()
    original = blocks[0]
    blocks[0] = _Recorder(original, sink)
    try:
        for ids, mask in calibration.batches(device):
            try:
                kwargs: dict[str, Any] = {"input_ids": ids}
                if mask is not None:
                    kwargs["attention_mask"] = mask
                if adapter.is_decoder:
                    kwargs["use_cache"] = False
                model(**kwargs)
            except _StopForward:
                pass
    finally:
        blocks[0] = original
    return sink


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """Outputs of ``block`` for every captured batch (they are the next block's inputs)."""
    return [call_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]


def advance(inputs: BlockInputs, outputs: list[torch.Tensor]) -> BlockInputs:
    """The inputs of the next block: new hidden states, same kwargs."""
    return BlockInputs(hidden=outputs, kwargs=inputs.kwargs)
