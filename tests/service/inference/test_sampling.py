"""Sampling parameters and incremental detokenisation with stop strings."""

from __future__ import annotations

import torch

from service.inference.sampling import SamplingParams, TextStream, make_generator, sample_next


def test_greedy_and_top_p() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [10.0, 0.0, 9.9]])
    greedy = SamplingParams(temperature=0.0)
    assert sample_next(logits, [greedy, greedy], [None, None]) == [1, 0]
    # top_p small enough keeps only the most likely token, whatever the seed
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    picks = {sample_next(logits[:1], [nucleus], [make_generator(s)])[0] for s in range(20)}
    assert picks == {1}
    # full nucleus at high temperature explores both tokens of the second row
    wide = SamplingParams(temperature=2.0, top_p=1.0)
    picks = {sample_next(logits[1:], [wide], [make_generator(s)])[0] for s in range(40)}
    assert picks == {0, 2}


def test_text_stream_holds_back_partial_stop_strings() -> None:
    vocab = {1: "ab", 2: "c", 3: "EN", 4: "D", 5: "x"}
    stream = TextStream(decode=lambda ids: "".join(vocab[i] for i in ids), stop=("END",))
    assert stream.push(1) == "ab"
    assert stream.push(2) == "c"
    assert stream.push(3) == ""  # "EN" could start "END": held back
    assert not stream.stopped
    assert stream.push(4) == ""  # "END" completed: nothing of it is emitted
    assert stream.stopped and stream.text == "abc"


def test_text_stream_releases_held_text_when_not_a_stop() -> None:
    vocab = {1: "E", 2: "x", 3: "\ufffd"}
    stream = TextStream(decode=lambda ids: "".join(vocab[i] for i in ids), stop=("END",))
    assert stream.push(1) == ""
    assert stream.push(2) == "Ex"
    assert stream.push(3) == ""  # an unfinished multi-byte character waits
    assert stream.flush() == "\ufffd"
    assert stream.text == "Ex\ufffd"
