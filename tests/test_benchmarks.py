"""The benchmark scripts that the test suite runs in a smoke mode (every part tiny, seconds)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_transformer_text_smoke_trains_every_part_through_the_library_run(tmp_path):
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "transformer_text.py", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "transformers.json").read_text())
    assert set(result["scratch"]) == {"residual", "midpoint", "leapfrog", "hamiltonian", "revnet"}
    for scheme, row in result["scratch"].items():  # the table is the runs' own metrics
        finals = [json.loads(p.read_text())["final_bpc"]
                  for p in sorted(tmp_path.glob(f"scratch-{scheme}-seed*/summary.json"))]
        assert row["seeds"] == finals
        assert row["mean"] == pytest.approx(sum(finals) / len(finals))
        assert (row["low"], row["high"]) == (min(finals), max(finals))
        curves = [[(int(r["step"]), float(r["val_bpc"])) for r in csv.DictReader(p.open())]
                  for p in sorted(tmp_path.glob(f"scratch-{scheme}-seed*/metrics.csv"))]
        assert [step for step, _ in row["mean_curve"]] == [step for step, _ in curves[0]]
        assert [b for _, b in row["mean_curve"]] == pytest.approx(
            [sum(points) / len(points) for points in zip(*([b for _, b in c] for c in curves))])
    seeds = {scheme: len(row["seeds"]) for scheme, row in result["scratch"].items()}
    assert seeds["residual"] == 2 and sorted(seeds.values()) == [1, 1, 1, 2, 2]  # and the best reversible scheme
    assert {(r["scheme"], r["init"]) for r in result["conversion"]} >= {("leapfrog", "rest"),
                                                                        ("leapfrog", "fixed-point")}
    deep = {r["model"]: r["saved_mb"] for r in result["memory"] if r["depth"] == 4}
    shallow = {r["model"]: r["saved_mb"] for r in result["memory"] if r["depth"] == 2}
    assert deep["leapfrog"] == shallow["leapfrog"] < deep["residual"]  # flat in depth; the residual model grows
    assert (tmp_path / "transformers-bpc.png").stat().st_size > 10_000


def test_engine_overhead_runs_its_four_variants():
    done = subprocess.run([sys.executable, "engine_overhead.py", "--blocks", "2", "--channels", "4", "--size", "8",
                           "--batch", "2", "--repeats", "1"],
                          cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in ("| plain |", "| reversible |", "| reversible, bare |", "| reversible, check every step |"):
        assert variant in done.stdout


def test_step_time_runs_plain_checkpointed_and_reversible_models():
    done = subprocess.run([sys.executable, "step_time.py", "--models", "hamiltonian-74", "--blocks", "2", "--channels",
                           "4", "--batch", "2", "--size", "8", "--repeats", "1", "--precisions", "fp32"],
                          cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    for mode in ("plain", "checkpoint", "reversible"):
        assert f"| hamiltonian | 2 | fp32 | {mode} |" in done.stdout
