"""Row planning and reporting of the end-to-end generation benchmark (CPU), and its KV rows on a GPU."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.e2e_generation import plan_rows, render, row_name


def test_plan_rows_adds_kv_rows_for_chosen_weights() -> None:
    assert plan_rows(["FP16", "W4A16", "W8A8"], [16, 8, 4], ["FP16"]) == [
        ("FP16", 16), ("FP16", 8), ("FP16", 4), ("W4A16", 16), ("W8A8", 16)]
    assert plan_rows(["FP16", "W4A16"], [16, 4], ["FP16", "W4A16"]) == [
        ("FP16", 16), ("FP16", 4), ("W4A16", 16), ("W4A16", 4)]
    assert plan_rows(["FP16"], [16], ["FP16"]) == [("FP16", 16)]
    assert [row_name(*r) for r in plan_rows(["FP16"], [16, 8, 4], ["FP16"])] == ["FP16", "FP16 + KV8", "FP16 + KV4"]
    with pytest.raises(ValueError, match="KV bits"):
        plan_rows(["FP16"], [6], ["FP16"])
    with pytest.raises(ValueError, match="weight scheme"):
        plan_rows(["W2"], [16], ["FP16"])


def test_render_reports_ratios_and_failures() -> None:
    args = argparse.Namespace(layers=8, prompt=32, new_tokens=64, context=4000)
    rows = [
        {"scheme": "FP16", "decode_tokens_per_s": 20.0, "first_token_s": 0.05, "graph_decode_tokens_per_s": 100.0,
         "graph_ms_per_token": 10.0, "kv_cache_MiB": 64.0, "graph_tokens_match_eager": True, "gpu_mem_GiB": 4.0},
        {"scheme": "FP16 + KV4", "eager_error": "RuntimeError: x", "graph_decode_tokens_per_s": 150.0,
         "graph_ms_per_token": 6.7, "kv_cache_MiB": 18.0, "graph_tokens_match_eager": True, "gpu_mem_GiB": 4.0},
    ]
    md = render({"device": "test", "rows": rows}, args)
    assert "| FP16 + KV4 | 150.0 | 1.50x | 6.700 | 18.0 | failed: RuntimeError: x |" in md
    assert "from position 4000 (unfilled context: speed only)" in md


@pytest.mark.gpu
def test_kv_rows_run_on_gpu() -> None:
    """One decoder layer of the 7B shape: FP16 / KV8 / KV4 rows run end to end, the graph-replayed tokens
    equal the eager static decoder's, and the quantized caches are smaller."""
    from benchmarks.e2e_generation import run_row

    args = argparse.Namespace(layers=1, prompt=16, new_tokens=8, context=512)
    prompt = torch.randint(1, 32000, (1, args.prompt), device="cuda", generator=None)
    rows = {bits: run_row("FP16", bits, args, prompt) for bits in (16, 8, 4)}
    for bits, row in rows.items():
        assert "graph_error" not in row and "eager_error" not in row, row
        assert row["graph_tokens_match_eager"], bits
        assert row["graph_decode_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert rows[4]["kv_cache_MiB"] < rows[8]["kv_cache_MiB"] < rows[16]["kv_cache_MiB"]
