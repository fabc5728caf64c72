"""benchmarks/device_check.py, the prepared device check: its CPU mode (`--device cpu --tiny`) runs every
stage at toy sizes and must leave one JSON file in which each stage has figures or says why it has none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import device_check  # noqa: E402  (benchmarks/ is not a package)

STAGE_NAMES = [name for name, _cap, _least in device_check.STAGES]


def run_check(tmp_path: Path, *extra: str, timeout: int = 600) -> dict:
    out = tmp_path / "out" / "device_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(out.parent.glob("*.partial.json")), "the children's partial files are merged and removed"
    return json.loads(out.read_text())


def check_entries(report: dict) -> None:
    assert report["schema"] == device_check.SCHEMA
    assert list(report["stages"]) == STAGE_NAMES
    for name, entry in report["stages"].items():
        if entry["status"] == "skipped":
            assert entry.get("reason"), name
        else:
            assert entry["status"] == "ok", (name, entry)
            assert entry["figures"], name


def test_environment_and_data_only(tmp_path):
    """The parent's bookkeeping: every stage listed, the ones left out with a reason, the JSON complete."""
    report = run_check(tmp_path, "--only", "environment,data")
    check_entries(report)
    env = report["stages"]["environment"]["figures"]
    assert env["device"] == "cpu" and env["bf16_matmul_tflops"] > 0
    assert report["stages"]["data"]["figures"]["shape"] == [16, 16, 3]
    assert report["stages"]["train_eager"] == {"status": "skipped", "reason": "not in --only"}
    assert report["stages"]["cuda_tests"]["reason"] == "not in --only"


@pytest.mark.slow
def test_every_stage_tiny_on_cpu(tmp_path):
    """Every stage at toy sizes (about 1-2 minutes on a loaded 2-core machine): figures or a reason each."""
    report = run_check(tmp_path)
    check_entries(report)
    stages = report["stages"]
    assert stages["cuda_tests"] == {"status": "skipped", "reason": "skipped: no CUDA"}
    for name in ("plan", "train_eager", "sampling", "eval_bpd", "fid", "train_compiled"):
        assert stages[name]["status"] == "ok", (name, stages[name])
    assert stages["plan"]["figures"]["plan"]["auto_micro_batch"] >= 1
    for name in ("train_eager", "train_compiled"):
        figures = stages[name]["figures"]
        assert figures["images_per_s"] > 0 and figures["time_to_first_step_s"] > 0 and "mfu" in figures
    cases = stages["sampling"]["figures"]["cases"]
    assert cases["auto"] == "skipped: no CUDA (CUDA graphs)"
    assert cases["auto_denoise"]["finite"] and cases["sequential_no_graphs"]["seconds"] > 0
    assert stages["fid"]["figures"]["inception"] == "random-0"
    if (REPO / "ref" / "transformer_flow.py").is_file():
        assert stages["reference"]["figures"]["max_abs_diff_reference_vs_sequential"] < 1e-3


def test_pytest_counts():
    output = "....\nSKIPPED [3] tests/core/a.py:61: needs a CUDA device\n74 passed, 4 skipped in 7.89s\n"
    counts, skips = device_check.pytest_counts(output)
    assert counts == {"passed": 74, "skipped": 4}
    assert skips == ["SKIPPED [3] tests/core/a.py:61: needs a CUDA device"]
    assert device_check.pytest_counts("no summary")[0] == {}
