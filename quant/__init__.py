"""qaas core quantization library: recipes, quantizers, transforms, methods, evaluation, artifacts."""
