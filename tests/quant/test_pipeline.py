from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from quant.artifacts import load_artifact
from quant.calibration.data import CalibrationData
from quant.pipeline import JobSpec, run_quantization
from quant.recipes.presets import get_preset
from quant.recipes.schema import CalibrationSpec, EvaluationSpec, Recipe
from tests.conftest import VOCAB, make_tiny_bert, make_tiny_llama


def _tokenizer(folder: Path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def _sequences(tokenizer, n: int, seq_len: int, seed: int, batch_size: int) -> CalibrationData:
    """A tiny 'corpus': word sequences with a repeating structure, tokenized by the model's tokenizer."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        start = int(torch.randint(0, 50, (1,), generator=g))
        texts.append(" ".join(f"w{(start + 3 * j) % (VOCAB - 5)}" for j in range(seq_len)))
    enc = tokenizer(texts, max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
    return CalibrationData(enc["input_ids"], attention_mask=enc["attention_mask"], batch_size=batch_size)


def _fake_corpus_module() -> types.ModuleType:
    """Stands in for quant.calibration.corpus with exactly the names the pipeline calls."""
    mod = types.ModuleType("quant.calibration.corpus")

    def build_calibration(tokenizer, spec: CalibrationSpec) -> CalibrationData:
        return _sequences(tokenizer, spec.num_samples, spec.seq_len, spec.seed, spec.batch_size)

    def build_eval_data(tokenizer, spec: EvaluationSpec) -> CalibrationData:
        return _sequences(tokenizer, spec.num_samples, spec.seq_len, 12345, 4)

    mod.build_calibration = build_calibration
    mod.build_eval_data = build_eval_data
    return mod


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    for name, model in (("tiny--llama", make_tiny_llama()), ("tiny--bert", make_tiny_bert())):
        model.save_pretrained(root / name)
        _tokenizer(root / name).save_pretrained(str(root / name))
    monkeypatch.setenv("QAAS_MODEL_STORE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setitem(sys.modules, "quant.calibration.corpus", _fake_corpus_module())
    return root


def _recipe(preset: str) -> Recipe:
    body = get_preset(preset).to_dict()
    body["calibration"] = {"num_samples": 8, "seq_len": 32, "batch_size": 4}
    body["evaluation"] = {"num_samples": 4, "seq_len": 32}
    return Recipe.model_validate(body)


def test_pipeline_causal_lm(store: Path, tmp_path: Path) -> None:
    events: list[tuple[float, str]] = []
    spec = JobSpec(model_id="tiny/llama", recipe=_recipe("gptq-w4a8"), artifact_dir=tmp_path / "out")
    result = run_quantization(spec, lambda f, m: events.append((f, m)))

    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(isinstance(m, str) and m for _, m in events)
    m = result.metrics
    for key in ("fp_ppl", "quant_ppl", "ppl_increase_pct", "kl_mean", "top1_agreement", "calibration_seconds",
                "size_bytes_fp", "size_bytes_quant"):
        assert key in m, key
    assert m["fp_ppl"] > 1.0 and m["quant_ppl"] > 1.0 and m["kl_mean"] > 0.0
    assert m["ppl_increase_pct"] == pytest.approx(100 * (m["quant_ppl"] - m["fp_ppl"]) / m["fp_ppl"])
    assert 0.0 <= m["top1_agreement"] <= 1.0 and m["size_bytes_quant"] < m["size_bytes_fp"]
    assert result.model_kind == "causal_lm"

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["base_model_id"] == "tiny/llama" and manifest["method"] == "gptq"
    assert manifest["metrics"] == pytest.approx(m)
    assert manifest["layers"] and "output_rel_err" in manifest["layers"][0]["metrics"]
    assert "tokenizer_config.json" in manifest["tokenizer_files"]

    qmodel, _ = load_artifact(tmp_path / "out")
    # the reloaded artifact reproduces the reported perplexity on the same held-out data
    from quant.evaluation import perplexity
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    data = sys.modules["quant.calibration.corpus"].build_eval_data(tok, spec.recipe.evaluation)
    assert perplexity(qmodel, data).ppl == pytest.approx(m["quant_ppl"], rel=1e-5)


def test_pipeline_encoder_with_kv(store: Path, tmp_path: Path) -> None:
    spec = JobSpec(model_id="tiny/bert", recipe=_recipe("rtn-w8a8kv8"), artifact_dir=tmp_path / "bert")
    result = run_quantization(spec)
    assert result.model_kind == "encoder"
    assert set(result.metrics) >= {"cosine_mean", "cosine_min", "calibration_seconds", "size_bytes_fp",
                                   "size_bytes_quant"}
    assert "fp_ppl" not in result.metrics
    assert 0.9 < result.metrics["cosine_min"] <= result.metrics["cosine_mean"] <= 1.0
    loaded, manifest = load_artifact(tmp_path / "bert")
    assert any(v["type"] == "kv_quantizer" for v in manifest.modules.values())


def test_pipeline_unknown_model(store: Path, tmp_path: Path) -> None:
    from quant.models.store import ModelNotFound

    with pytest.raises(ModelNotFound):
        run_quantization(JobSpec(model_id="tiny/absent", recipe=_recipe("rtn-w8a8"), artifact_dir=tmp_path / "x"))
    assert not (tmp_path / "x").exists()
