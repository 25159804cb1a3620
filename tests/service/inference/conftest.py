"""Fixtures of the inference tests: a character-level tokenizer matching the tiny models' 128-token
vocabulary, and tiny random models quantized with RTN (W4 g32, A8) so every forward goes through
QuantLinear. Mechanics only: the models are random, outputs mean nothing."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import VOCAB, make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

PAD, EOS, UNK = 0, 1, 2


def make_char_tokenizer():
    """<pad>=0, <eos>=1, <unk>=2, then one token per printable ASCII character (vocab = 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}
    for code in range(32, 32 + VOCAB - len(vocab)):
        vocab[chr(code)] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def quantize_rtn(model: torch.nn.Module) -> torch.nn.Module:
    from quant.methods.base import get_method
    from quant.recipes.schema import Recipe

    recipe = Recipe.model_validate(
        {
            "method": {"name": "rtn"},
            "weight": {"bits": 4, "granularity": "per_group", "group_size": 32},
            "activation": {"bits": 8},
        }
    )
    return get_method("rtn").calibrate(model, make_calibration(), recipe)


def quantized_llama(seed: int = 0) -> torch.nn.Module:
    model = make_tiny_llama(seed=seed)
    model.generation_config.eos_token_id = None  # random weights: let max_tokens decide the length
    model.config.eos_token_id = None
    return quantize_rtn(model)


def quantized_opt(seed: int = 0) -> torch.nn.Module:
    model = make_tiny_opt(seed=seed)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return quantize_rtn(model)


def quantized_bert(seed: int = 0) -> torch.nn.Module:
    return quantize_rtn(make_tiny_bert(seed=seed))


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
