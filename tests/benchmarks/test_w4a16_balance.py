"""The tile-count sweep of the W4A16 decode benchmark: the widths it times and its table (no GPU needed)."""

from __future__ import annotations

from benchmarks.w4a16_balance import tiles_per_sm_widths, to_markdown


def test_widths_give_whole_tiles_per_sm_around_llama_7b() -> None:
    """4, 5 and 6 16-row tiles per SM and LLaMA-7B's 11008 outputs, in order (132 SMs: H100 / H200)."""
    assert tiles_per_sm_widths(132) == [8448, 10560, 11008, 12672]
    assert tiles_per_sm_widths(78) == [4992, 6240, 7488, 11008]
    assert tiles_per_sm_widths(172) == [11008, 13760, 16512]  # 11008 is exactly 4 tiles per SM there


def test_table_rows_give_time_and_ratio_to_fp16() -> None:
    rows = [{"N": 11008, "K": 4096, "fp16_us": 24.0, "variants": {"9": 8.0, "3": 9.6}}]
    md = to_markdown(rows, [9, 3], 132, "GPU")
    lines = md.splitlines()
    assert lines[0].startswith("W4A16 decode, 1 token, K = 4096, on GPU (132 SMs)")
    assert "| v9: persistent, zero points folded, PDL" in lines[2] and "| v3: 16 warps x 2 blocks, PDL |" in lines[2]
    assert lines[4] == "| 11008 | 5.21 | 24.00 | 8.00 (3.00x) | 9.60 (2.50x) |"


def test_table_names_the_token_count() -> None:
    rows = [{"N": 4096, "K": 11008, "tokens": 4, "fp16_us": 27.0, "variants": {"11": 9.0}}]
    md = to_markdown(rows, [11], 132, "GPU")
    assert md.splitlines()[0].startswith("W4A16 decode, 4 tokens, K = 11008, on GPU (132 SMs)")
    assert "| 4096 | 1.94 | 27.00 | 9.00 (3.00x) |" in md
