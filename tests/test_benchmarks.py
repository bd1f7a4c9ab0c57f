"""The benchmark scripts run (tiny settings); their numbers are measured by hand, not asserted."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_hypergrad_accuracy_smoke(tmp_path):
    import hypergrad_accuracy

    out = tmp_path / "table.md"
    lines = hypergrad_accuracy.main(["--smoke", "--out", str(out)])
    assert out.read_text() == "\n".join(lines) + "\n"  # --out writes the printed table
    rows = [line for line in lines[2:] if line.startswith("| ridge | mlopt |")]
    assert {r.split("|")[3].strip() for r in rows} >= {"cg", "neumann", "reverse", "forward"}
    cg = next(r for r in rows if r.split("|")[3].strip() == "cg")
    assert float(cg.split("|")[5]) < 1.0  # a relative error was computed
