from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from quant.models import sources
from quant.models.store import ModelNotFound, list_local_models, load_model, model_kind, resolve_model
from tests.conftest import make_tiny_bert, make_tiny_llama


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv("QAAS_MODEL_STORE", str(root))
    # an empty HF cache of our own: no accidental hits from the machine's cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("QAAS_ALLOW_HUB", raising=False)
    return root


def test_store_folder_by_id_and_org_name(store: Path) -> None:
    make_tiny_llama(layers=1).save_pretrained(store / "acme--tiny-llama")
    make_tiny_bert(layers=1).save_pretrained(store / "tiny-bert")
    r = resolve_model("acme/tiny-llama")
    assert r.source == "store" and r.path == store / "acme--tiny-llama"
    assert resolve_model("tiny-bert").path == store / "tiny-bert"
    ids = {m.model_id: m for m in list_local_models()}
    assert ids["acme/tiny-llama"].model_type == "llama" and ids["tiny-bert"].source == "store"


def test_load_causal_and_encoder(store: Path) -> None:
    ref = make_tiny_llama(layers=1)
    ref.save_pretrained(store / "acme--tiny-llama")
    make_tiny_bert(layers=1).save_pretrained(store / "tiny-bert")
    loaded = load_model("acme/tiny-llama", dtype="float32")
    assert loaded.kind == "causal_lm" and loaded.path == store / "acme--tiny-llama"
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits)
    enc = load_model("tiny-bert")
    assert enc.kind == "encoder" and type(enc.model).__name__ == "BertModel"
    assert model_kind(enc.model.config) == "encoder"


def test_package_source_then_local_path(store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pkg-model"
    make_tiny_bert(layers=1).save_pretrained(folder)
    sources.register_source("pkg/tiny-bert", lambda: folder)
    try:
        r = resolve_model("pkg/tiny-bert")
        assert r.source == "package" and r.path == folder
        assert any(m.model_id == "pkg/tiny-bert" and m.source == "package" for m in list_local_models())
    finally:
        sources.unregister_source("pkg/tiny-bert")
    r = resolve_model(str(folder))
    assert r.source == "path" and r.path == folder.resolve()


def test_missing_source_package_is_skipped(store: Path) -> None:
    def missing() -> Path:
        raise ImportError("package not installed")

    sources.register_source("pkg/absent", missing)
    try:
        with pytest.raises(ModelNotFound) as err:
            resolve_model("pkg/absent")
        assert err.value.model_id == "pkg/absent"
    finally:
        sources.unregister_source("pkg/absent")


def test_model_not_found_names_the_id(store: Path) -> None:
    with pytest.raises(ModelNotFound) as err:
        load_model("nobody/no-such-model")
    assert err.value.model_id == "nobody/no-such-model"
    assert "nobody/no-such-model" in str(err.value)


def test_hub_fallback_is_opt_in(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAAS_ALLOW_HUB", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempts
    assert resolve_model("nobody/no-such-model").source == "hub"
    # the hub code path (from_pretrained with the id) runs and, offline, surfaces as ModelNotFound
    with pytest.raises(ModelNotFound):
        load_model("nobody/no-such-model")


def test_hf_cache_resolution(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # lay out a minimal HF cache entry for "acme/cached" the way huggingface_hub stores snapshots
    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--cached"
    snap = repo / "snapshots" / ("0" * 40)
    make_tiny_llama(layers=1).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    r = resolve_model("acme/cached")
    assert r.source == "hf_cache" and r.path == snap
    assert load_model("acme/cached").kind == "causal_lm"
