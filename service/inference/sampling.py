"""Token sampling (greedy / temperature / nucleus) and incremental detokenisation with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample_next(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row of ``logits`` [B, V] under each row's own sampling parameters."""
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(-1)
            keep = cum - sorted_p < p.top_p  # smallest prefix whose mass reaches top_p (always keeps the first)
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        choice = torch.multinomial(probs.cpu(), 1, generator=generators[i])
        out[i] = int(choice.item())
    return out


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed)


@dataclass
class TextStream:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Text that could still become (the start of) a stop string, or a split multi-byte character,
    is held back until it is safe to emit.
    """

    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    text: str = ""
    emitted: int = 0
    stopped: bool = False
    _ids: list[int] = field(default_factory=list)

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly safe text (may be empty). Sets ``stopped`` on a stop string."""
        self._ids.append(token_id)
        full = self.decode(self._ids)
        cut = self._first_stop(full)
        if cut is not None:
            self.text = full[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        self.text = full
        safe = len(full) - self._holdback(full)
        return self._emit(safe)

    def flush(self) -> str:
        """Emit everything left (at the end of generation)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

    def _first_stop(self, full: str) -> int | None:
        hits = [i for s in self.stop if s and (i := full.find(s, max(0, self.emitted - len(s)))) >= 0]
        return min(hits) if hits else None

    def _holdback(self, full: str) -> int:
        hold = 0
        if full.endswith("\ufffd"):
            hold = 1
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold
