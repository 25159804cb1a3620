"""Per-channel activation statistics of each LinearGroup input, collected with forward hooks.

Scaling-based methods (SmoothQuant, OS+) need, for the input ``X [tokens, C]`` of every linear group:

- per-channel ``max`` / ``min`` (hence ``absmax``, centre and half-range) over all calibration tokens
  (padding positions excluded when the calibration data carries an attention mask);
- for searches that score candidates by quantized output error (OS+), a uniform random sample of
  input tokens, capped per group and overall so memory stays bounded however large the calibration
  set is.

The sample is a reservoir kept with random keys: every token seen gets a ``U(0, 1)`` key and the
``cap`` tokens with the smallest keys are kept, i.e. a uniform sample without replacement over all
tokens seen so far, holding at most ``cap + batch`` rows at any time. Samples live on the CPU in
float32; running max/min stay on the model's device.

All groups are observed in one forward pass over the calibration data. Because the transforms these
methods fold are exact in floating point, statistics of the original model stay valid for every
group after other groups have been transformed (each group's input only changes by its own
transform).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.models.adapters import BlockInfo, LinearGroup, ModelAdapter

#: default cap on the bytes all token samples together may hold (float32 on the CPU)
DEFAULT_SAMPLE_BUDGET_BYTES = 1 << 30
#: a group never gets fewer sample tokens than this when any were asked for (budget permitting or not)
MIN_SAMPLE_TOKENS = 16

GroupFilter = Callable[[BlockInfo, LinearGroup], bool]
Progress = Callable[[float, str], None]


def group_key(block: BlockInfo, group: LinearGroup) -> str:
    """Stable identifier of a linear group: ``<block name>:<kind>``."""
    return f"{block.name}:{group.kind}"


@dataclass
class ChannelStats:
    """Statistics of one group input with ``C`` channels."""

    max: torch.Tensor  # [C] float32
    min: torch.Tensor  # [C] float32
    tokens: int  # tokens observed (padding excluded)
    sample: torch.Tensor | None = None  # [n <= cap, C] float32 (CPU), uniform over observed tokens

    @property
    def channels(self) -> int:
        return int(self.max.numel())

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.max.abs(), self.min.abs())

    @property
    def center(self) -> torch.Tensor:
        """``(max + min) / 2``: the OS+ channel-wise shift."""
        return (self.max + self.min) / 2

    @property
    def half_range(self) -> torch.Tensor:
        """``(max - min) / 2``: the absmax of the channel once centred."""
        return (self.max - self.min) / 2


class _Accumulator:
    def __init__(self, channels: int, cap: int, generator: torch.Generator) -> None:
        self.channels = channels
        self.cap = cap
        self.generator = generator
        self.max: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.tokens = 0
        self.sample: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        xf = x.detach().float()
        bmax, bmin = xf.amax(dim=0), xf.amin(dim=0)
        self.max = bmax if self.max is None else torch.maximum(self.max, bmax)
        self.min = bmin if self.min is None else torch.minimum(self.min, bmin)
        self.tokens += int(xf.shape[0])
        if self.cap <= 0:
            return
        rows = xf.cpu()
        keys = torch.rand(rows.shape[0], generator=self.generator)
        if self.sample is not None and self.keys is not None:
            rows = torch.cat((self.sample, rows), 0)
            keys = torch.cat((self.keys, keys), 0)
        if rows.shape[0] > self.cap:
            keep = torch.topk(keys, self.cap, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.sample, self.keys = rows.contiguous(), keys

    def result(self) -> ChannelStats:
        if self.max is None or self.min is None:
            raise RuntimeError("no tokens were observed for this group (empty calibration data or fully masked)")
        return ChannelStats(max=self.max, min=self.min, tokens=self.tokens, sample=self.sample)


def sample_caps(
    channels: dict[str, int], sample_tokens: int, budget_bytes: int = DEFAULT_SAMPLE_BUDGET_BYTES
) -> dict[str, int]:
    """Tokens sampled per target: the same count for every target, ``sample_tokens`` unless the
    budget (float32 rows of all targets together) holds fewer; never below :data:`MIN_SAMPLE_TOKENS`
    (nor above ``sample_tokens``)."""
    if sample_tokens <= 0 or not channels:
        return {k: 0 for k in channels}
    fit = budget_bytes // (4 * max(1, sum(channels.values())))
    n = min(sample_tokens, max(MIN_SAMPLE_TOKENS, fit))
    return {k: n for k in channels}


class _MaskState:
    """The attention mask of the batch currently running (set by the collection loop)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


def _valid_tokens(x: torch.Tensor, state: _MaskState) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    mask = state.mask
    if mask is None or mask.numel() != flat.shape[0]:
        return flat
    return flat[mask.reshape(-1).to(device=flat.device).bool()]


def _forward_batch(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    kwargs: dict[str, object] = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if adapter.is_decoder:
        kwargs["use_cache"] = False
    model(**kwargs)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    adapter: ModelAdapter,
    calibration: CalibrationData,
    targets: dict[str, nn.Module],
    sample_tokens: int = 0,
    budget_bytes: int = DEFAULT_SAMPLE_BUDGET_BYTES,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, ChannelStats]:
    """Statistics of the (first positional) input of each module in ``targets`` over ``calibration``."""
    device = next(model.parameters()).device
    channels = {k: int(getattr(m, "in_features")) for k, m in targets.items()}
    caps = sample_caps(channels, sample_tokens, budget_bytes)
    generator = torch.Generator().manual_seed(seed)
    accs = {k: _Accumulator(channels[k], caps[k], generator) for k in targets}
    state = _MaskState()
    handles = []

    def make_hook(acc: _Accumulator):
        def hook(module: nn.Module, args: tuple) -> None:
            acc.update(_valid_tokens(args[0], state))

        return hook

    for key, module in targets.items():
        handles.append(module.register_forward_pre_hook(make_hook(accs[key])))
    was_training = model.training
    model.eval()
    try:
        n_batches = max(1, -(-calibration.num_samples // calibration.batch_size))
        for i, (ids, mask) in enumerate(calibration.batches(device)):
            state.mask = mask
            _forward_batch(model, adapter, ids, mask)
            if progress is not None:
                progress((i + 1) / n_batches, f"activation statistics: batch {i + 1}/{n_batches}")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: acc.result() for k, acc in accs.items()}


def collect_group_stats(
    model: nn.Module,
    adapter: ModelAdapter,
    calibration: CalibrationData,
    select: GroupFilter | None = None,
    sample_tokens: int = 0,
    budget_bytes: int = DEFAULT_SAMPLE_BUDGET_BYTES,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, ChannelStats]:
    """Input statistics of every linear group (or those ``select`` keeps), keyed by :func:`group_key`.

    All linears of a group read the same tensor, so one hook on the group's first linear suffices.
    """
    targets: dict[str, nn.Module] = {}
    for block in adapter.iter_blocks():
        for group in block.groups:
            if select is None or select(block, group):
                targets[group_key(block, group)] = next(iter(group.linears.values()))
    return collect_input_stats(model, adapter, calibration, targets, sample_tokens, budget_bytes, seed, progress)


def chunk_targets(channels: dict[str, int], sample_tokens: int, budget_bytes: int) -> list[list[str]]:
    """Split targets (in order) into runs whose full samples (``sample_tokens`` x channels x 4 bytes)
    fit the budget together; a target larger than the budget on its own gets a run of its own."""
    chunks: list[list[str]] = []
    used = 0
    for key, c in channels.items():
        need = sample_tokens * c * 4
        if chunks and used + need <= budget_bytes:
            chunks[-1].append(key)
            used += need
        else:
            chunks.append([key])
            used = need
    return chunks


def iter_group_stats(
    model: nn.Module,
    adapter: ModelAdapter,
    calibration: CalibrationData,
    select: GroupFilter | None = None,
    sample_tokens: int = 0,
    budget_bytes: int = DEFAULT_SAMPLE_BUDGET_BYTES,
    seed: int = 0,
    progress: Progress | None = None,
) -> Iterator[dict[str, ChannelStats]]:
    """Like :func:`collect_group_stats`, but when the full samples of all groups exceed the budget the
    groups are split into consecutive runs, one calibration pass per run, yielded one at a time, so
    every group gets ``sample_tokens`` tokens while at most one run's samples are held.

    The caller may transform the model between runs: statistics of later groups are read from the
    model as it is then, which is what a method folding FP-exact transforms wants.
    """
    targets: dict[str, nn.Module] = {}
    for block in adapter.iter_blocks():
        for group in block.groups:
            if select is None or select(block, group):
                targets[group_key(block, group)] = next(iter(group.linears.values()))
    channels = {k: int(getattr(m, "in_features")) for k, m in targets.items()}
    chunks = chunk_targets(channels, sample_tokens, budget_bytes) if sample_tokens > 0 else [list(targets)]
    for i, chunk in enumerate(chunks):
        if not chunk:
            continue
        sub = None
        if progress is not None:
            lo, hi = i / len(chunks), (i + 1) / len(chunks)
            sub = lambda f, m, lo=lo, hi=hi: progress(lo + (hi - lo) * f, m)  # noqa: E731
        yield collect_input_stats(
            model, adapter, calibration, {k: targets[k] for k in chunk}, sample_tokens, budget_bytes, seed + i, sub
        )


def groups_of(kinds: Iterable[str]) -> GroupFilter:
    """A filter keeping the groups of the given kinds."""
    wanted = set(kinds)
    return lambda block, group: group.kind in wanted
