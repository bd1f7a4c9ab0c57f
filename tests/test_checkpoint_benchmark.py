"""benchmarks/checkpoint_reverse.py runs (tiny settings); its numbers are measured by hand."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_checkpoint_reverse_benchmark_smoke(tmp_path):
    import checkpoint_reverse

    out = tmp_path / "checkpoint_reverse.json"
    results = checkpoint_reverse.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    (run,) = results["runs"]
    assert run["T"] == run["updates_per_unit"] == 4
    rows = run["methods"]
    assert set(rows) == {"none", "2"}
    # deterministic: plain reverse replays nothing; k=2 on 4 updates replays [0, 2), keeps [2, 4)
    assert rows["none"]["recomputed_updates"] == 0 and rows["2"]["recomputed_updates"] == 2
    assert rows["2"]["segment"] == 2 and rows["2"]["live_updates"] == 2
    assert rows["2"]["first_hypergradient_max_rel_diff"] < 1e-5  # float32 rounding at most
    assert all(r["peak_bytes"] >= 0 and r["median_s"] > 0 for r in rows.values())
