"""Quantized-model artifacts: ``model.safetensors`` + ``manifest.json`` (+ tokenizer files)."""

from quant.artifacts.manifest import FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, ArtifactManifest
from quant.artifacts.store import (
    ArtifactError,
    ArtifactIntegrityError,
    load_artifact,
    load_artifact_tokenizer,
    read_manifest,
    save_artifact,
    verify_artifact,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactManifest",
    "load_artifact",
    "load_artifact_tokenizer",
    "read_manifest",
    "save_artifact",
    "verify_artifact",
]
