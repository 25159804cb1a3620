from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quant.artifacts import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactManifest,
    load_artifact,
    load_artifact_tokenizer,
    read_manifest,
    save_artifact,
)
from quant.methods.base import get_method
from quant.modules.linear import QuantLinear
from quant.modules.quantized_kv_cache import has_quantized_kv
from quant.recipes.presets import get_preset
from tests.conftest import VOCAB, make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

CASES = {
    "llama-rtn-w4a4kv4": (make_tiny_llama, "rtn-w4a4kv4"),
    "llama-gptq-w4a16-g128-tied": (lambda: make_tiny_llama(), "gptq-w4a8"),
    "opt-rtn-w8a8kv8": (make_tiny_opt, "rtn-w8a8kv8"),
    "bert-rtn-w6a6": (make_tiny_bert, "rtn-w6a6"),
}


def _output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _bert_tokenizer(tmp_path: Path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_round_trip(case: str, tmp_path: Path) -> None:
    build, preset = CASES[case]
    recipe = get_preset(preset)
    q = get_method(recipe.method.name).calibrate(build(), make_calibration(), recipe)
    folder = tmp_path / "artifact"
    saved = save_artifact(q, folder, ArtifactManifest(base_model_id="tiny/" + case, recipe=recipe, metrics={"x": 1.0}))
    assert (folder / "model.safetensors").is_file() and (folder / "manifest.json").is_file()
    assert saved.method == recipe.method.name and len(saved.weights_sha256) == 64
    assert saved.layers and saved.modules

    loaded, manifest = load_artifact(folder)
    assert manifest == read_manifest(folder)
    assert manifest.recipe == recipe and manifest.metrics == {"x": 1.0}
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(
        [m for m in q.modules() if isinstance(m, QuantLinear)]
    )
    assert loaded.config._attn_implementation == q.config._attn_implementation
    # generation serves a loaded KV-quantized artifact from the real quantized cache
    assert has_quantized_kv(loaded) == recipe.kv_cache.enabled
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded, ids), _output(q, ids), rtol=0, atol=0)


def test_tied_embeddings_and_fp16(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=True)
    # built the way from_pretrained(dtype=bf16) builds it (rotary inverse frequencies stay fp32)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    recipe = get_preset("rtn-w8a8")
    q = get_method("rtn").calibrate(model, make_calibration(), recipe)
    save_artifact(q, tmp_path, ArtifactManifest(base_model_id="tiny/tied", recipe=recipe))
    loaded, manifest = load_artifact(tmp_path)
    assert manifest.dtype == "bfloat16"
    assert manifest.tied_parameters == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, q(ids).logits, rtol=0, atol=0)


def test_tampered_weights_are_detected(tmp_path: Path) -> None:
    recipe = get_preset("rtn-w8a8")
    q = get_method("rtn").calibrate(make_tiny_llama(layers=1), make_calibration(), recipe)
    save_artifact(q, tmp_path, ArtifactManifest(base_model_id="tiny", recipe=recipe))
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="modified"):
        load_artifact(tmp_path)


def test_bad_manifest_version_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        load_artifact(tmp_path)
    recipe = get_preset("rtn-w8a8")
    q = get_method("rtn").calibrate(make_tiny_llama(layers=1), make_calibration(), recipe)
    save_artifact(q, tmp_path, ArtifactManifest(base_model_id="tiny", recipe=recipe))
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["format_version"] = 999
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version"):
        load_artifact(tmp_path)


def test_tokenizer_saved_alongside(tmp_path: Path) -> None:
    tok = _bert_tokenizer(tmp_path)
    recipe = get_preset("rtn-w8a8")
    q = get_method("rtn").calibrate(make_tiny_bert(layers=1), make_calibration(), recipe)
    out = tmp_path / "artifact"
    manifest = save_artifact(q, out, ArtifactManifest(base_model_id="tiny", recipe=recipe), tokenizer=tok)
    assert "tokenizer_config.json" in manifest.tokenizer_files
    assert {"tokenizer.json", "vocab.txt"} & set(manifest.tokenizer_files)
    loaded_tok = load_artifact_tokenizer(out)
    assert loaded_tok is not None and loaded_tok("w1 w2")["input_ids"] == tok("w1 w2")["input_ids"]
    # copying from a model folder works too
    out2 = tmp_path / "artifact2"
    m2 = save_artifact(q, out2, ArtifactManifest(base_model_id="tiny", recipe=recipe), tokenizer_source=tmp_path)
    assert m2.tokenizer_files == ["vocab.txt"]


def test_untied_by_method_stays_untied(tmp_path: Path) -> None:
    """A method that changes lm_head apart from the embeddings (rotations) must not be re-tied on load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2.0)
    recipe = get_preset("rtn-w8a8")
    q = get_method("rtn").calibrate(model, make_calibration(), recipe)
    manifest = save_artifact(q, tmp_path, ArtifactManifest(base_model_id="tiny/untied", recipe=recipe))
    assert manifest.tied_parameters == [] and manifest.base_config["tie_word_embeddings"] is False
    loaded, _ = load_artifact(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, q(ids).logits, rtol=0, atol=0)


def test_resave_into_same_folder_keeps_tokenizer_list(tmp_path: Path) -> None:
    tok = _bert_tokenizer(tmp_path)
    recipe = get_preset("rtn-w8a8")
    q = get_method("rtn").calibrate(make_tiny_bert(layers=1), make_calibration(), recipe)
    first = save_artifact(q, tmp_path / "a", ArtifactManifest(base_model_id="tiny", recipe=recipe), tokenizer=tok)
    second = save_artifact(q, tmp_path / "a", ArtifactManifest(base_model_id="tiny", recipe=recipe), tokenizer=tok)
    assert first.tokenizer_files == second.tokenizer_files and "tokenizer_config.json" in second.tokenizer_files
    assert first.weights_sha256 == second.weights_sha256  # deterministic serialisation
