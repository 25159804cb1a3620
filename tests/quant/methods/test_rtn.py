from __future__ import annotations

import pytest
import torch

from quant.methods.base import get_method
from quant.modules.linear import QuantLinear
from quant.recipes.presets import get_preset
from tests.conftest import make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

BUILDERS = {"llama": make_tiny_llama, "opt": make_tiny_opt, "bert": make_tiny_bert}


def _output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_rtn_end_to_end(arch: str) -> None:
    build = BUILDERS[arch]
    fp = build()
    model = build()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _output(fp, ids)
    progress: list[float] = []
    q = get_method("rtn").calibrate(model, make_calibration(), get_preset("rtn-w8a8"), lambda f, m: progress.append(f))
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == (7 if arch == "llama" else 6) * 2
    assert not any(isinstance(m, torch.nn.Linear) for n, m in q.named_modules() if ".layers." in n or ".layer." in n)
    assert progress == sorted(progress) and progress[-1] == 1.0
    with torch.no_grad():
        out = _output(q, ids)
    rel = float((out - ref).norm() / ref.norm())
    assert 0.0 < rel < 0.1, rel  # W8A8 changes the output, but only a little
    report = q.quant_report
    assert report.method == "rtn" and len(report.layers) == len(linears)
    assert 0.0 < report.summary["weight_rel_err_max"] < 0.05


def test_rtn_w4_worse_than_w8() -> None:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = make_tiny_llama()(ids).logits.detach()
    errs = {}
    for preset in ("rtn-w8a8", "rtn-w4a4"):
        q = get_method("rtn").calibrate(make_tiny_llama(), make_calibration(), get_preset(preset))
        with torch.no_grad():
            errs[preset] = float((q(ids).logits - ref).norm() / ref.norm())
    assert errs["rtn-w8a8"] < errs["rtn-w4a4"]
