"""Asyncio batching engines: many concurrent requests -> few batched forward passes in a worker thread.

:class:`GenerationEngine` does continuous batching. Requests wait in a queue; when the engine is
idle it collects up to ``max_batch_size`` of them for at most ``max_wait_ms`` and prefills them in
one forward pass (left padding + attention mask). Then every decode step is one forward pass over
all active sequences with their KV caches; between decode steps, newly arrived requests are
prefilled together and join the running batch, and finished ones leave it.

:class:`EmbeddingEngine` collects embedding inputs the same way and embeds them in one pass.

The event loop never runs torch: the worker thread does, and hands results back with
``loop.call_soon_threadsafe``. A client that goes away (stream closed) marks its sequence
cancelled; the worker drops it at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Union

import torch

from service.inference.runner import DecoderRunner, EncoderRunner, KVBatch
from service.inference.sampling import SamplingParams, TextStream, make_generator, sample_next

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    text: str


@dataclass(frozen=True)
class Failed:
    error: str


Event = Union[TextDelta, Finished, Failed]


@dataclass(frozen=True)
class EngineStats:
    requests: int
    forward_passes: int
    prefill_passes: int
    decode_passes: int
    max_batch_size_seen: int
    batch_sizes: tuple[int, ...]


class _Channel:
    """Thread -> event-loop delivery of one request's events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # loop closed: the client is gone
            pass


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    channel: _Channel
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False


class _WorkerThread:
    """A daemon thread with a condition-guarded pending queue; subclasses implement ``_run``."""

    def __init__(self, name: str, max_batch_size: int, max_wait_ms: float) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self._cv = threading.Condition()
        self._pending: deque = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._guarded_run, name=name, daemon=True)
        self._thread.start()

    def _enqueue(self, item: object) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._pending.append(item)
            self._cv.notify()

    def _take(self, room: int, wait_for_first: bool) -> list:
        """Pop up to ``room`` pending items. When idle, block for the first and then gather for max_wait."""
        with self._cv:
            if wait_for_first:
                while not self._pending and not self._closed:
                    self._cv.wait()
                deadline = time.monotonic() + self.max_wait_s
                while len(self._pending) < room and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
            taken = []
            while self._pending and len(taken) < room:
                taken.append(self._pending.popleft())
            return taken

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> bool:
        """Whether the worker thread is still alive (it exits after close() once its work is done)."""
        return self._thread.is_alive()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting work; the thread finishes what it holds and exits."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _guarded_run(self) -> None:
        try:
            self._run()
        except Exception:  # pragma: no cover - _run handles per-batch errors itself
            log.exception("inference worker thread crashed")

    def _run(self) -> None:
        raise NotImplementedError


class GenerationEngine(_WorkerThread):
    def __init__(
        self,
        runner: DecoderRunner,
        decode: Callable[[list[int]], str],
        eos_token_ids: set[int],
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        name: str = "generation-engine",
    ) -> None:
        self.runner = runner
        self.decode_text = decode
        self.eos_token_ids = set(eos_token_ids)
        self._requests = 0
        self._prefills = 0
        self._decodes = 0
        super().__init__(name, max_batch_size, max_wait_ms)

    # ------------------------------------------------------------------ asyncio side
    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Submit one prompt; yields text deltas and then one Finished (or Failed) event."""
        channel = _Channel(asyncio.get_running_loop())
        seq = _Sequence(
            prompt=list(prompt),
            params=params,
            stream=TextStream(decode=self.decode_text, stop=params.stop),
            channel=channel,
            generator=make_generator(params.seed),
        )
        self._enqueue(seq)
        try:
            while True:
                event = await channel.queue.get()
                yield event
                if not isinstance(event, TextDelta):
                    return
        finally:
            seq.cancelled = True

    def stats(self) -> EngineStats:
        sizes = tuple(self.runner.batch_sizes)
        return EngineStats(
            requests=self._requests,
            forward_passes=self.runner.forward_passes,
            prefill_passes=self._prefills,
            decode_passes=self._decodes,
            max_batch_size_seen=max(sizes, default=0),
            batch_sizes=sizes,
        )

    # ------------------------------------------------------------------ worker side
    def _run(self) -> None:
        batch: KVBatch | None = None
        active: list[_Sequence] = []
        while True:
            room = self.max_batch_size - len(active)
            new: list[_Sequence] = self._take(room, wait_for_first=not active) if room > 0 else []
            if not active and not new and self._closed:
                return
            new = [s for s in new if not s.cancelled]
            try:
                if new:
                    self._requests += len(new)
                    self._prefills += 1
                    fresh, logits = self.runner.prefill([s.prompt for s in new])
                    self._accept(new, logits)
                    batch = self.runner.merge(batch, fresh)
                    active = active + new
                batch, active = self._drop_finished(batch, active)
                if active:
                    assert batch is not None
                    self._decodes += 1
                    logits = self.runner.decode(batch, [s.generated[-1] for s in active])
                    self._accept(active, logits)
                    batch, active = self._drop_finished(batch, active)
            except Exception as exc:  # a failed pass fails the requests in it, not the engine
                log.exception("batched forward pass failed")
                for s in active + new:
                    if not s.done:
                        s.done = True
                        s.channel.put(Failed(f"{type(exc).__name__}: {exc}"))
                batch, active = None, []

    def _accept(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        tokens = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for s, tok in zip(seqs, tokens):
            if s.done:
                continue
            if tok in self.eos_token_ids:
                self._finish(s, "stop")
                continue
            s.generated.append(tok)
            delta = s.stream.push(tok)
            if delta:
                s.channel.put(TextDelta(delta))
            if s.stream.stopped:
                self._finish(s, "stop")
            elif len(s.generated) >= s.params.max_tokens:
                self._finish(s, "length")
            elif len(s.prompt) + len(s.generated) >= self.runner.max_positions:
                self._finish(s, "length")

    def _finish(self, s: _Sequence, reason: str) -> None:
        rest = s.stream.flush()
        if rest:
            s.channel.put(TextDelta(rest))
        s.done = True
        s.channel.put(Finished(reason, len(s.prompt), len(s.generated), s.stream.text))

    def _drop_finished(self, batch: KVBatch | None, active: list[_Sequence]) -> tuple[KVBatch | None, list[_Sequence]]:
        keep = [i for i, s in enumerate(active) if not s.done and not s.cancelled]
        if len(keep) == len(active):
            return batch, active
        if batch is None:
            return None, []
        return self.runner.select(batch, keep), [active[i] for i in keep]


@dataclass
class _EmbedRequest:
    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(fut: asyncio.Future, value: object = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class EmbeddingEngine(_WorkerThread):
    """Embeds the inputs of many concurrent requests together (``max_batch_size`` inputs per pass)."""

    def __init__(
        self, runner: EncoderRunner, max_batch_size: int = 32, max_wait_ms: float = 10.0, name: str = "embedding-engine"
    ) -> None:
        self.runner = runner
        self._requests = 0
        super().__init__(name, max_batch_size, max_wait_ms)

    async def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._enqueue(_EmbedRequest(inputs=[list(x) for x in inputs], loop=loop, future=fut))
        return await fut

    def stats(self) -> EngineStats:
        sizes = tuple(self.runner.batch_sizes)
        return EngineStats(
            requests=self._requests,
            forward_passes=self.runner.forward_passes,
            prefill_passes=self.runner.forward_passes,
            decode_passes=0,
            max_batch_size_seen=max(sizes, default=0),
            batch_sizes=sizes,
        )

    def _run(self) -> None:
        while True:
            # requests, not inputs, are queued: take up to max_batch_size requests then pack inputs
            taken: list[_EmbedRequest] = self._take(self.max_batch_size, wait_for_first=True)
            if not taken:
                if self._closed:
                    return
                continue
            self._requests += len(taken)
            flat = [x for r in taken for x in r.inputs]
            try:
                parts = [self.runner.embed(flat[i : i + self.max_batch_size]) for i in range(0, len(flat), self.max_batch_size)]
                vectors = torch.cat(parts) if len(parts) > 1 else parts[0]
            except Exception as exc:
                log.exception("batched embedding pass failed")
                for r in taken:
                    r.loop.call_soon_threadsafe(_resolve, r.future, None, RuntimeError(f"{type(exc).__name__}: {exc}"))
                continue
            start = 0
            for r in taken:
                part = vectors[start : start + len(r.inputs)]
                start += len(r.inputs)
                try:
                    r.loop.call_soon_threadsafe(_resolve, r.future, part)
                except RuntimeError:
                    pass
