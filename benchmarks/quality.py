"""Quality benchmark: every registered method at the standard bit settings on real weights.

For each model and each (preset setting, method) it runs the production pipeline
(:func:`quant.pipeline.run_quantization`: load -> corpus calibration/held-out data -> FP metrics ->
calibrate -> quantized metrics -> artifact) and records perplexity on the held-out split of the
``default`` corpus (causal LMs) or cosine agreement of mean-pooled embeddings (encoders), KL and top-1
agreement with the FP model, and calibration time. Results are written after every job (so a run cut
short still leaves its rows) as JSON and a markdown table under ``--out``.

    python -m benchmarks.quality --device cuda --out benchmarks/results           # GPU machine
    python -m benchmarks.quality render benchmarks/results/quality_X.json --append benchmarks/RESULTS.md
    python -m benchmarks.quality --models qaas/llama-small --settings w4a4 --device cpu \
        --methods rtn smoothquant 'smoothquant:{"alpha": "auto"}'                # method-parameter variants

The FP baseline is the model as shipped (fp16 weights for qaas/llama-small, fp32 for MiniLM) run in
``--dtype`` (float32 by default): methods calibrate and fake-quantize in that precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ("qaas/llama-small", "sentence-transformers/all-MiniLM-L6-v2")
DEFAULT_SETTINGS = ("w8a8", "w4a16-g128", "w4a8", "w4a4kv4")


def machine_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    import os

    return f"CPU {platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:{json}``: a method and the parameters overriding its preset's ones."""
    name, sep, params = spec.partition(":")
    if not sep:
        return name, {}
    value = json.loads(params)
    if not isinstance(value, dict):
        raise ValueError(f"method parameters must be a JSON object: {spec!r}")
    return name, value


def method_label(method: str, params: dict[str, Any] | None) -> str:
    if not params:
        return method
    return f"{method} ({', '.join(f'{k}={v}' for k, v in params.items())})"


def _recipe(method: str, setting: str, args: argparse.Namespace, params: dict[str, Any] | None = None):
    from quant.recipes import presets
    from quant.recipes.schema import Recipe

    body = presets.get_preset(f"{method}-{setting}").to_dict()
    body["method"].update(params or {})
    body["calibration"] = {"source": args.corpus, "num_samples": args.calib_samples, "seq_len": args.seq_len,
                           "seed": args.seed, "batch_size": args.batch_size}
    body["evaluation"] = {"corpus": args.corpus, "num_samples": args.eval_samples, "seq_len": args.seq_len}
    return Recipe.model_validate(body)


def run(args: argparse.Namespace) -> Path:
    import torch

    from quant.methods.base import registered_methods
    from quant.pipeline import JobSpec, run_quantization
    from quant.recipes.schema import METHOD_NAMES

    available = set(registered_methods())
    specs = [parse_method(m) for m in (args.methods or METHOD_NAMES)]
    methods = [(m, params) for m, params in specs if m in available]
    missing = [m for m, _ in specs if m not in available]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"quality_{stamp}.json"
    doc: dict[str, Any] = {
        "benchmark": "quality",
        "started_utc": stamp,
        "machine": machine_name(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "corpus": args.corpus,
        "calibration": {"num_samples": args.calib_samples, "seq_len": args.seq_len, "seed": args.seed},
        "evaluation": {"num_samples": args.eval_samples, "seq_len": args.seq_len},
        "methods_run": [method_label(m, params) for m, params in methods],
        "methods_not_registered": missing,
        "rows": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model_id in args.models:
            for setting in args.settings:
                for method, params in methods:
                    row: dict[str, Any] = {"model": model_id, "setting": setting, "method": method}
                    if params:
                        row["method_params"] = params
                    if time.perf_counter() - start > args.time_limit:
                        row.update(status="not run (time limit)")
                        doc["rows"].append(row)
                        continue
                    t0 = time.perf_counter()
                    try:
                        result = run_quantization(JobSpec(
                            model_id=model_id, recipe=_recipe(method, setting, args, params),
                            artifact_dir=Path(tmp) / f"{method}-{setting}-{len(doc['rows'])}", device=args.device,
                            dtype=args.dtype,
                        ))
                        row.update(status="ok", kind=result.model_kind, metrics=result.metrics)
                    except Exception as exc:  # noqa: BLE001 - one failing cell must not end the benchmark
                        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                        traceback.print_exc(file=sys.stderr)
                    row["wall_seconds"] = time.perf_counter() - t0
                    doc["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    doc["elapsed_seconds"] = time.perf_counter() - start
                    path.write_text(json.dumps(doc, indent=1))
    doc["elapsed_seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(doc, indent=1))
    md = render(doc)
    path.with_suffix(".md").write_text(md)
    print(md)
    return path


# ------------------------------------------------------------------------------------------ rendering
def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render(doc: dict[str, Any]) -> str:
    """Markdown: one table per model (rows: setting x method), FP baseline first."""
    lines = [
        f"Machine: {doc['machine']}; device {doc['device']}, compute dtype {doc['dtype']}; corpus `{doc['corpus']}` "
        f"(calibration {doc['calibration']['num_samples']} x {doc['calibration']['seq_len']} tokens, seed "
        f"{doc['calibration']['seed']}; held-out evaluation up to {doc['evaluation']['num_samples']} x "
        f"{doc['evaluation']['seq_len']} tokens). Methods not registered at run time: "
        f"{', '.join(doc['methods_not_registered']) or 'none'}.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["model"] == model]
        ok = [r for r in rows if r["status"] == "ok"]
        encoder = bool(ok) and ok[0].get("kind") == "encoder"
        lines.append(f"**{model}**" + (" (encoder: cosine of mean-pooled embeddings vs FP)" if encoder else ""))
        lines.append("")
        if encoder:
            lines += ["| setting | method | cosine mean | cosine min | calib s | status |", "|---|---|---:|---:|---:|---|"]
        else:
            fp = next((r["metrics"]["fp_ppl"] for r in ok), None)
            lines.append(f"FP perplexity: {_fmt(fp, '.3f')}")
            lines.append("")
            lines += ["| setting | method | ppl | Δppl % | KL | top-1 | calib s | status |",
                      "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            m = r.get("metrics", {})
            status = r["status"] if r["status"] != "error" else f"error: {r['error'][:120]}"
            if encoder:
                cells = [_fmt(m.get("cosine_mean"), ".5f"), _fmt(m.get("cosine_min"), ".5f")]
            else:
                cells = [_fmt(m.get("quant_ppl"), ".3f"), _fmt(m.get("ppl_increase_pct"), "+.2f"),
                         _fmt(m.get("kl_mean"), ".4f"), _fmt(m.get("top1_agreement"), ".4f")]
            cells.append(_fmt(m.get("calibration_seconds"), ".1f"))
            label = method_label(r["method"], r.get("method_params"))
            lines.append(f"| {r['setting'].upper()} | {label} | " + " | ".join(cells) + f" | {status} |")
        lines.append("")
    return "\n".join(lines)


def render_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.quality render")
    p.add_argument("results", nargs="+", type=Path, help="quality_*.json files")
    p.add_argument("--append", type=Path, help="append the tables to this markdown file (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--title", default="quality")
    args = p.parse_args(argv)
    parts = []
    for path in args.results:
        doc = json.loads(path.read_text())
        md = render(doc)
        path.with_suffix(".md").write_text(md)
        parts.append(f"Raw: `{path.as_posix()}`.\n\n{md}")
    text = "\n".join(parts)
    if args.append:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with args.append.open("a") as fh:
            fh.write(f"\n\n## {args.title} — {when}\n\n`python -m benchmarks.quality` (quant.pipeline.run_quantization per cell).\n\n{text}")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "render":
        return render_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="preset bit settings")
    p.add_argument("--methods", nargs="+", default=None,
                   help='default: every registered method; NAME:{json} overrides method parameters, '
                        'e.g. \'smoothquant:{"alpha": "auto"}\'')
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--corpus", default="default")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=1e9, help="seconds; later cells are marked not run")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
