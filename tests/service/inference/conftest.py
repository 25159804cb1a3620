"""Fixtures of the inference tests: a character-level tokenizer matching the tiny models' 128-token
vocabulary, and tiny random models quantized with RTN (W4 g32, A8) so every forward goes through
QuantLinear. Mechanics only: the models are random, outputs mean nothing."""

from __future__ import annotations

import pytest

from tests.service.inference.helpers import make_char_tokenizer, quantized_bert, quantized_llama, quantized_opt


@pytest.fixture(scope="module")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def qllama():
    return quantized_llama()


@pytest.fixture(scope="module")
def qopt():
    return quantized_opt()


@pytest.fixture(scope="module")
def qbert():
    return quantized_bert()
