"""Command line: ``python -m quant.cli quantize --model ID --recipe NAME|FILE --out DIR`` and
``python -m quant.cli recipes``.

``quantize`` prints the job's metrics as one JSON object on stdout (progress goes to stderr);
``recipes`` lists the preset names, one per line (``--json`` for the full recipes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from quant.recipes.presets import get_preset, list_presets
from quant.recipes.schema import Recipe


def resolve_recipe(ref: str) -> Recipe:
    """A preset name, or a path to a YAML / JSON recipe file."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {ref} does not exist")
        return Recipe.from_file(path)
    try:
        return get_preset(ref)
    except KeyError:
        raise KeyError(f"{ref!r} is neither a recipe preset nor a recipe file; see `python -m quant.cli recipes`") from None


def _progress(fraction: float, message: str) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)


def cmd_quantize(args: argparse.Namespace) -> int:
    from quant.models.store import ModelNotFound
    from quant.pipeline import JobSpec, run_quantization

    try:
        recipe = resolve_recipe(args.recipe)
    except (KeyError, FileNotFoundError, ValidationError, ValueError) as exc:
        print(f"error: invalid recipe: {exc}", file=sys.stderr)
        return 2
    spec = JobSpec(model_id=args.model, recipe=recipe, artifact_dir=Path(args.out), device=args.device, dtype=args.dtype)
    try:
        result = run_quantization(spec, _progress if not args.quiet else (lambda f, m: None))
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps({"model_id": result.model_id, "artifact": str(result.artifact_path), "metrics": result.metrics},
                     sort_keys=True))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({name: get_preset(name).to_dict() for name in list_presets()}, indent=2))
    else:
        for name in list_presets():
            print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quant.cli", description="qaas quantization library")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and save the artifact")
    q.add_argument("--model", required=True, help="model ID (model store, HF cache, package source) or local path")
    q.add_argument("--recipe", required=True, help="preset name (see `recipes`) or a YAML/JSON recipe file")
    q.add_argument("--out", required=True, help="artifact folder")
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    q.add_argument("--quiet", action="store_true", help="no progress on stderr")
    q.set_defaults(func=cmd_quantize)
    r = sub.add_parser("recipes", help="list the recipe presets")
    r.add_argument("--json", action="store_true", help="print the full recipes as JSON")
    r.set_defaults(func=cmd_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
