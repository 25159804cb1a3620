"""Shared fixtures: tiny random models (mechanics only, never quality claims) and calibration data."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, int(os.environ.get("QAAS_TEST_THREADS", "2"))))

VOCAB = 128


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the GPU checks (marker ``gpu``) only where CUDA is, and the CPU-only checks (``cpu_only``)
    only where it is not: the other kind is deselected (listed as such in the summary), never skipped.
    The GPU checks run on the device machine through ``kernels/device_run.sh``."""
    cuda = torch.cuda.is_available()
    unwanted = "cpu_only" if cuda else "gpu"
    keep = [item for item in items if item.get_closest_marker(unwanted) is None]
    dropped = [item for item in items if item.get_closest_marker(unwanted) is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _with_outliers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a random model the channel-wise activation outliers real LLMs have: a few norm
    channels scaled up (and, for LayerNorm, shifted), so outlier-aware methods have work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 1 or "norm" not in type(module).__name__.lower():
                continue
            n = weight.shape[0]
            idx = torch.randperm(n, generator=g)[: max(1, n // 16)]
            weight[idx] *= 20.0
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias[idx] += 5.0
    return model


def make_tiny_llama(kv_heads: int = 2, layers: int = 2, seed: int = 0, outliers: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    return _with_outliers(model, seed) if outliers else model


def make_tiny_opt(layers: int = 2, seed: int = 0, outliers: bool = True):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
    )
    model = OPTForCausalLM(cfg).eval()
    return _with_outliers(model, seed) if outliers else model


def make_tiny_bert(layers: int = 2, seed: int = 0, outliers: bool = True):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, vocab_size=VOCAB
    )
    model = BertModel(cfg).eval()
    return _with_outliers(model, seed) if outliers else model


def make_calibration(num_samples: int = 8, seq_len: int = 32, seed: int = 0, batch_size: int = 4):
    from quant.calibration.data import CalibrationData

    g = torch.Generator().manual_seed(seed)
    return CalibrationData(torch.randint(0, VOCAB, (num_samples, seq_len), generator=g), batch_size=batch_size)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def calibration():
    return make_calibration()
