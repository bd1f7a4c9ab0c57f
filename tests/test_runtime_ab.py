"""Bit-for-bit A/B test of the runtime: frozen outputs of float64 programs (tests/ab_programs.py).

Exact equality (``torch.equal``) on a build and CPU kind that froze the outputs (one golden file per
platform, each frozen by the old runtime at commit ad44e9b); elsewhere (a different torch build,
vector ISA or AMX may round differently) the tensors must agree to 1e-12.
"""

import pytest
import torch
from ab_programs import PROGRAMS, golden_path, platform, run_program

golden = torch.load(golden_path(), weights_only=True)
EXACT = golden.get("__platform__") == platform()


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
                torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
