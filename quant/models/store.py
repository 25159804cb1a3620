"""Resolve a model ID to HF-format files on this machine, and load it.

Resolution order (first hit wins):

1. the local model store ``$QAAS_MODEL_STORE``: a folder ``<id>`` (``org/name`` nested) or
   ``<org>--<name>`` containing ``config.json``;
2. the Hugging Face cache, offline (``try_to_load_from_cache`` / ``snapshot_download(local_files_only=True)``);
3. package-provided sources registered in :mod:`quant.models.sources`;
4. a local path (a folder with ``config.json``).

When none resolves, :class:`ModelNotFound` is raised, unless the hub is allowed
(``QAAS_ALLOW_HUB=1``), in which case ``from_pretrained(model_id)`` is tried as on any machine with
hub access. Loading uses ``local_files_only=True`` for every resolved folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from torch import nn

from quant.models.sources import locate_source, registered_sources
from quant.settings import get_settings

ModelKind = Literal["causal_lm", "encoder"]

#: model types loaded with ``AutoModel`` (bidirectional encoders producing embeddings)
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2", "albert"}
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelNotFound(LookupError):
    def __init__(self, model_id: str, detail: str = "") -> None:
        self.model_id = model_id
        msg = f"model {model_id!r} not found offline (model store, HF cache, package sources, local path)"
        super().__init__(msg + (f": {detail}" if detail else ""))


class ResolvedModel(BaseModel):
    model_id: str
    path: Path | None  # None: to be fetched from the hub by id
    source: Literal["store", "hf_cache", "package", "path", "hub"]


class LocalModel(BaseModel):
    model_id: str
    path: Path
    source: Literal["store", "hf_cache", "package"]
    model_type: str | None = None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    path: Path | None
    kind: ModelKind
    model_id: str = ""


# ---------------------------------------------------------------------------------- resolution
def _has_config(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _store_candidates(model_id: str, store: Path) -> list[Path]:
    cands = [store / model_id]
    if "/" in model_id:
        cands.append(store / model_id.replace("/", "--"))
    return cands


def _from_store(model_id: str, store: Path) -> Path | None:
    if not store.is_dir() or not model_id or model_id.startswith(("/", ".")) or ".." in model_id.split("/"):
        return None
    for cand in _store_candidates(model_id, store):
        if _has_config(cand):
            return cand
    return None


def _from_hf_cache(model_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except (HFValidationError, ValueError):
        return None
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached).parent
    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss (not cached, invalid id, offline) means "not here"
        return None
    return folder if _has_config(folder) else None


def _from_path(model_id: str) -> Path | None:
    try:
        path = Path(model_id).expanduser()
        return path.resolve() if _has_config(path) else None
    except (OSError, ValueError):
        return None


def resolve_model(model_id: str, store: Path | None = None, allow_hub: bool | None = None) -> ResolvedModel:
    settings = get_settings()
    store = Path(store) if store is not None else settings.model_store
    if (p := _from_store(model_id, store)) is not None:
        return ResolvedModel(model_id=model_id, path=p, source="store")
    if (p := _from_hf_cache(model_id)) is not None:
        return ResolvedModel(model_id=model_id, path=p, source="hf_cache")
    if (p := locate_source(model_id)) is not None:
        return ResolvedModel(model_id=model_id, path=p, source="package")
    if (p := _from_path(model_id)) is not None:
        return ResolvedModel(model_id=model_id, path=p, source="path")
    if allow_hub if allow_hub is not None else settings.allow_hub:
        return ResolvedModel(model_id=model_id, path=None, source="hub")
    raise ModelNotFound(model_id)


# ---------------------------------------------------------------------------------- loading
def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'") from None


def model_kind(config) -> ModelKind:
    """``causal_lm`` for decoder LMs, ``encoder`` for BERT-like encoders (loaded with AutoModel)."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    if getattr(config, "model_type", None) in ENCODER_MODEL_TYPES:
        return "encoder"
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return "causal_lm" if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else "encoder"


def _load_tokenizer(ref: str, local_only: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref, local_files_only=local_only)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_model(
    model_id: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "float32",
    store: Path | None = None,
) -> LoadedModel:
    """Resolve ``model_id`` and load model + tokenizer (tokenizer is None when no files ship one)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    resolved = resolve_model(model_id, store=store)
    local_only = resolved.source != "hub"
    ref = str(resolved.path) if resolved.path is not None else model_id
    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=local_only)
    except OSError as exc:
        raise ModelNotFound(model_id, str(exc)) from exc
    kind = model_kind(config)
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    # use_kernels=False: no Hugging Face hub kernels (downloaded at load time, and never what we quantize or serve;
    # transformers >= 5.2x turns them on by default and fails where their package is absent: scripts/install.sh)
    model = auto.from_pretrained(
        ref, config=config, dtype=resolve_dtype(dtype), local_files_only=local_only, use_kernels=False
    )
    model = model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=_load_tokenizer(ref, local_only),
        path=resolved.path,
        kind=kind,
        model_id=model_id,
    )


# ---------------------------------------------------------------------------------- listing
def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _store_models(store: Path) -> list[LocalModel]:
    out: list[LocalModel] = []
    if not store.is_dir():
        return out
    for child in sorted(store.iterdir()):
        if not child.is_dir():
            continue
        if _has_config(child):
            out.append(LocalModel(model_id=child.name.replace("--", "/", 1), path=child, source="store",
                                  model_type=_model_type(child)))
            continue
        for sub in sorted(child.iterdir()):  # org/name nesting
            if sub.is_dir() and _has_config(sub):
                out.append(LocalModel(model_id=f"{child.name}/{sub.name}", path=sub, source="store",
                                      model_type=_model_type(sub)))
    return out


def _cache_models() -> list[LocalModel]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache dir, unreadable cache: nothing listed
        return []
    out: list[LocalModel] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            if _has_config(rev.snapshot_path):
                out.append(LocalModel(model_id=repo.repo_id, path=rev.snapshot_path, source="hf_cache",
                                      model_type=_model_type(rev.snapshot_path)))
                break
    return out


def list_local_models(store: Path | None = None) -> list[LocalModel]:
    """Every model loadable offline: store folders, HF-cache snapshots, available package sources."""
    store = Path(store) if store is not None else get_settings().model_store
    found = _store_models(store) + _cache_models()
    seen = {m.model_id.lower() for m in found}
    for key in registered_sources():
        if key in seen:
            continue
        path = locate_source(key)
        if path is not None:
            found.append(LocalModel(model_id=key, path=path, source="package", model_type=_model_type(path)))
    return found
