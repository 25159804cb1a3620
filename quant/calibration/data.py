"""Calibration data handed to methods: tokenized sequences, ready to feed the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CalibrationData:
    """``input_ids`` is ``[num_samples, seq_len]`` (int64); ``attention_mask`` likewise or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError("input_ids must be [num_samples, seq_len]")

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def batches(self, device: torch.device | str | None = None):
        for start in range(0, self.num_samples, self.batch_size):
            ids = self.input_ids[start : start + self.batch_size]
            mask = None if self.attention_mask is None else self.attention_mask[start : start + self.batch_size]
            if device is not None:
                ids = ids.to(device)
                mask = None if mask is None else mask.to(device)
            yield ids, mask
