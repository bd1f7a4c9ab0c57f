"""The benchmark scripts run (tiny settings); their numbers are measured by hand, not asserted."""

import json
import sys
from pathlib import Path

import pytest

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


def test_engine_overhead_smoke(tmp_path):
    import engine_overhead

    out = tmp_path / "overhead.json"
    results = engine_overhead.main(
        ["--smoke", "--units", "1", "--processes", "1", "--interleaved", "2", "--out", str(out)]
    )
    assert set(results["workloads"]) == {"rhg-2", "rhg-wd-2", "hpo-cg", "darts"}
    for row in results["workloads"].values():
        # the same computation: the first hypergradients agree (float32 rounding at most)
        assert row["first_hypergradient_max_rel_diff"] < 1e-5
        assert row["units_per_process"] == 1 and row["ratio"] > 0
        assert row["plain"]["peak_mb"] >= 0 and row["mlopt"]["peak_mb"] >= 0
        assert row["interleaved_rounds"] == 2 and row["mlopt"]["interleaved_ratio"] > 0
    assert out.exists()


def test_engine_overhead_records_missing_peers_as_skipped(tmp_path, monkeypatch):
    import engine_overhead

    monkeypatch.setenv("MLOPT_PEERS_VENV", str(tmp_path / "no-such-venv"))
    results = engine_overhead.main(
        ["--smoke", "--units", "1", "--processes", "1", "--peers", "--only", "hpo-cg"]
    )
    row = results["workloads"]["hpo-cg"]
    assert row["torchopt"] == {"skipped": "the peers environment was not found"}
    assert results["peers_python"].startswith("not found")


def test_gpu_check_smoke(tmp_path):
    import json

    import gpu_check

    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    keys = {"torch", "cuda", "device", "smoke", "maml", "rhg", "amp", "host_syncs", "seconds"}
    assert keys <= set(result)
    maml = result["maml"]["results"]
    assert {"mlopt-engine", "mlopt-vmap", "mlopt-loop", "higher", "torchopt"} == set(maml)
    for name in ("mlopt-engine", "mlopt-vmap", "mlopt-loop"):
        assert maml[name]["agrees"] and maml[name]["on_device"] and maml[name]["median_s"] > 0
    rhg = result["rhg"]["results"]
    assert set(rhg) == {"reverse", "checkpoint=2"}
    assert rhg["checkpoint=2"]["first_hypergradient_rel_diff"] < 1e-5
    amp = result["amp"]["results"]
    assert {"reverse", "cg", "neumann", "finite_difference", "sama"} <= set(amp)
    assert all(0 <= row["bf16_vs_fp64"] < 0.1 for row in amp.values())


def test_run_all_writes_the_table_between_the_markers(tmp_path, monkeypatch):
    import run_all

    monkeypatch.setenv("MLOPT_PEERS_VENV", str(tmp_path / "no-such-venv"))
    doc = tmp_path / "benchmarks.md"
    import cost_model

    doc.write_text(
        f"# title\n\n{run_all.BEGIN}\nSTALE-TABLE\n{run_all.END}\n\n"
        f"{cost_model.BEGIN}\nSTALE-COSTS\n{cost_model.END}\n\nkept\n"
    )
    out, cost = tmp_path / "overhead.json", tmp_path / "cost.json"
    args = ["--smoke", "--units", "1", "--processes", "1", "--doc", str(doc), "--out", str(out)]
    args += ["--interleaved", "1", "--cost-out", str(cost)]
    results = run_all.main(args)
    text = doc.read_text()
    assert "STALE-TABLE" not in text and text.endswith("kept\n") and "| implicit HPO" in text
    assert "STALE-COSTS" not in text and "| cg 10 |" in text and json.loads(cost.read_text())
    assert "not run" in text  # the peers, recorded as skipped
    assert results["units"] == 1 and json.loads(out.read_text())["machine"]
    rerender = ["--from-json", str(out), "--cost-out", str(cost), "--doc", str(doc)]
    run_all.main(rerender)  # re-rendering gives the same
    assert doc.read_text() == text


def test_cost_model_smoke(tmp_path):
    import cost_model

    out = tmp_path / "cost.json"
    args = ["--smoke", "--units", "1", "--processes", "1", "--T", "3", "--out", str(out)]
    results = cost_model.main(args + ["--only", "reverse", "cg 10", "forward"])
    rows = results["methods"]
    assert set(rows) == {"reverse", "cg 10", "forward"}
    assert rows["reverse"]["floor_units"] == {"g": 3, "hvp": 3, "up": 1}
    assert rows["cg 10"]["floor_units"] == {"g": 3, "hvp": 11, "up": 1}
    assert all(r["ratio"] > 0 and r["peak_mb"] >= 0 for r in rows.values())
    assert rows["forward"]["ratio_jvp"] > 0 and "ratio_jvp" not in rows["reverse"]
    assert json.loads(out.read_text())["T"] == 3


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_benchmark_smoke_agrees_with_plain(tmp_path, first_order):
    import maml_benchmark

    if not Path(maml_benchmark._DATA).exists():
        pytest.skip("Omniglot minimal splits not found")
    argv = [
        "--smoke",
        "--only",
        "plain",
        "mlopt-loop",
        "mlopt-engine",
        "--out",
        str(tmp_path / "m"),
    ]
    result = maml_benchmark.main(argv + (["--first-order"] if first_order else []))
    assert [r["name"] for r in result["results"]] == ["plain", "mlopt-loop", "mlopt-engine"]
    assert json.loads((tmp_path / "m").read_text())["workload"]["first_order"] is first_order
    # main() exits before timing unless every row reproduced plain's float64 meta-gradient
    assert all(r["ratio_to_plain"] > 0 for r in result["results"])
