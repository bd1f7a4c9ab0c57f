"""Bit-for-bit A/B test of the runtime: frozen outputs of float64 programs (tests/ab_programs.py).

Exact equality (``torch.equal``) on a build and CPU kind that froze the outputs (one golden file
per platform, each frozen by the old runtime at commit ad44e9b on an AMD EPYC); elsewhere (another
torch build, CPU vendor, vector ISA or AMX may round differently) the tensors must agree to 1e-10
relative (1e-6 for the one program that amplifies rounding).
"""

import pytest
import torch
from ab_programs import PROGRAMS, golden_path, platform, run_program

golden = torch.load(golden_path(), weights_only=True)
EXACT = golden.get("__platform__") == platform()
# measured on an Intel Xeon against the AMD EPYC golden: the upper's CG hypergradient grows
# another CPU's last-bit differences step by step (1e-15, 1e-12, 2.5e-8 relative at step 3)
CROSS_PLATFORM_RTOL = {"fp16_scaler_upper": 1e-6}


def test_every_program_is_frozen():
    assert sorted(k for k in golden if k != "__platform__") == sorted(PROGRAMS)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program_outputs_unchanged(name):
    want, got = golden[name], run_program(name)
    assert sorted(got) == sorted(want)
    assert got["describe"] == want["describe"]
    assert got["steps"] == want["steps"]
    for key in want:
        if isinstance(want[key], torch.Tensor):
            if EXACT:
                assert torch.equal(got[key], want[key]), f"{name}: {key} changed"
            else:
                rtol = CROSS_PLATFORM_RTOL.get(name, 1e-10)
                torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=1e-12)
