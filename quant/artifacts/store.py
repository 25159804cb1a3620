"""Save a quantized model as ``model.safetensors`` + ``manifest.json`` and load it back.

Saving writes the full state dict (every tensor contiguous, shared storages duplicated so nothing is
shared), copies the tokenizer files, and records in the manifest the base model's config and class,
the qaas module layout (:mod:`quant.modules.registry`), the recipe, metrics and the per-layer report,
and the sha256 of the weights file. Loading builds the base architecture from the stored config (no
weights are downloaded or read from the model store), re-installs the qaas modules, verifies the hash
and loads the state dict strictly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant.artifacts.manifest import FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, ArtifactManifest
from quant.modules.registry import install_modules, record_modules

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
)


class ArtifactError(RuntimeError):
    pass


class ArtifactIntegrityError(ArtifactError):
    """The weights file does not match the hash recorded in the manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def standalone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint copy of the state dict (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if (ptr and ptr in seen) or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel():
            seen.add(ptr)
        out[name] = t.contiguous().cpu()
    return out


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (tied embeddings), as the model has them now."""
    by_ptr: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.numel():
            by_ptr.setdefault(p.data_ptr(), []).append(name)
    return [sorted(names) for names in by_ptr.values() if len(names) > 1]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def apply_tying(model: nn.Module, groups: list[list[str]]) -> None:
    """Make parameter sharing exactly ``groups``: untie what the fresh model tied, tie what was tied."""
    for names in tied_parameter_groups(model):
        for name in names[1:]:
            owner, attr = _owner(model, name)
            old = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
    for names in groups:
        first_owner, first_attr = _owner(model, names[0])
        shared = getattr(first_owner, first_attr)
        for name in names[1:]:
            owner, attr = _owner(model, name)
            setattr(owner, attr, shared)


def _clean_config(config: Any, tied: list[list[str]]) -> dict[str, Any]:
    data = config.to_dict()
    for key in list(data):
        if key.startswith("_attn_implementation") or key.startswith("_experts_implementation"):
            data.pop(key)
    if data.get("tie_word_embeddings") and not tied:
        data["tie_word_embeddings"] = False  # a method untied them (e.g. different rotations)
    return data


def _copy_tokenizer(folder: Path, tokenizer: Any | None, tokenizer_source: Path | None) -> list[str]:
    """Save (or copy) the tokenizer files into ``folder``; returns their names."""
    names: set[str] = set()
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        for saved in tokenizer.save_pretrained(str(folder)) or ():
            path = Path(saved)
            if path.is_file() and path.parent.resolve() == folder.resolve():
                names.add(path.name)
    elif tokenizer_source is not None and Path(tokenizer_source).is_dir():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_source) / name
            if src.is_file():
                shutil.copy2(src, folder / name)
                names.add(name)
    return sorted(names - {WEIGHTS_FILE, MANIFEST_FILE})


def save_artifact(
    model: nn.Module,
    folder: str | Path,
    manifest: ArtifactManifest,
    tokenizer: Any | None = None,
    tokenizer_source: str | Path | None = None,
) -> ArtifactManifest:
    """Write ``model.safetensors`` + ``manifest.json`` (+ tokenizer files) to ``folder``; returns the
    completed manifest."""
    from quant.models.store import model_kind

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    # one metadata key only: safetensors writes metadata from a hash map, so several keys come out in a
    # random order and the file hash would differ between saves of the same model
    save_file(standalone_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    tok_files = _copy_tokenizer(folder, tokenizer, Path(tokenizer_source) if tokenizer_source else None)
    report = getattr(model, "quant_report", None)
    tied = tied_parameter_groups(model)
    try:
        from importlib.metadata import version

        qaas_version = version("qaas")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        qaas_version = "source"
    full = manifest.model_copy(
        update={
            "format_version": FORMAT_VERSION,
            "method": manifest.method or manifest.recipe.method.name,
            "model_kind": model_kind(model.config),
            "architecture": type(model).__name__,
            "base_config": _clean_config(model.config, tied),
            "tied_parameters": tied,
            "dtype": _dtype_name(_model_dtype(model)),
            "modules": record_modules(model),
            "layers": manifest.layers or (list(report.layers) if report is not None else []),
            "report_summary": manifest.report_summary or (dict(report.summary) if report is not None else {}),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha256_file(weights),
            "size_bytes": weights.stat().st_size,
            "tokenizer_files": tok_files or manifest.tokenizer_files,
            "created_at": manifest.created_at or dt.datetime.now(dt.timezone.utc).isoformat(),
            "qaas_version": qaas_version,
        }
    )
    tmp_manifest = folder / (MANIFEST_FILE + ".tmp")
    tmp_manifest.write_text(full.model_dump_json(indent=2))
    os.replace(tmp_manifest, folder / MANIFEST_FILE)
    return full


def read_manifest(folder: str | Path) -> ArtifactManifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_FILE} in {folder}")
    data = json.loads(path.read_text())
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"unsupported artifact format version {version!r} (this build reads {FORMAT_VERSION})")
    return ArtifactManifest.model_validate(data)


def verify_artifact(folder: str | Path, manifest: ArtifactManifest | None = None) -> ArtifactManifest:
    """Check the weights file against the manifest's sha256; returns the manifest."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    weights = folder / manifest.weights_file
    if not weights.is_file():
        raise ArtifactError(f"missing weights file {weights}")
    digest = sha256_file(weights)
    if digest != manifest.weights_sha256:
        raise ArtifactIntegrityError(
            f"{weights} has sha256 {digest}, manifest records {manifest.weights_sha256}: the artifact was modified"
        )
    return manifest


def build_base_model(manifest: ArtifactManifest, device: str | torch.device = "cpu") -> nn.Module:
    """The base architecture from the stored config, randomly initialised (weights come from the artifact)."""
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = dict(manifest.base_config)
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ArtifactError(f"unknown model_type {model_type!r} in the artifact config")
    config = CONFIG_MAPPING[model_type].from_dict(cfg)
    cls = getattr(transformers, manifest.architecture, None)
    if cls is None:
        raise ArtifactError(f"transformers has no model class {manifest.architecture!r}")
    dtype = getattr(torch, manifest.dtype, torch.float32) if manifest.dtype else torch.float32
    try:  # skip the random initialisation: every tensor is overwritten by the artifact
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with torch.device(device), no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def load_artifact(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ArtifactManifest]:
    """Rebuild the quantized model saved in ``folder`` on ``device``; returns ``(model, manifest)``."""
    folder = Path(folder)
    manifest = verify_artifact(folder)
    model = build_base_model(manifest, device)
    install_modules(model, manifest.modules)
    apply_tying(model, manifest.tied_parameters)
    state = load_file(str(folder / manifest.weights_file), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=True)
    if missing or unexpected:  # strict=True raises first; kept for clarity under future torch semantics
        raise ArtifactError(f"state dict mismatch: missing={missing}, unexpected={unexpected}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), manifest


def load_artifact_tokenizer(folder: str | Path) -> Any | None:
    """The tokenizer saved with the artifact, or None when none was saved."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
