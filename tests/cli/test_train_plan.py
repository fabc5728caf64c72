"""`tarflow train --plan`: the memory plan of the settings given (preset, options, the data's shape),
printed as lines or one JSON object, exit 0, nothing trained; and the memory options at the command line."""

from __future__ import annotations

import json

from tarflow_cli.main import app
from tarflow_core.memory import GiB, largest_micro_batch
from tarflow_core.train.micro import largest_divisor

from .test_train_cli import SMALL, assert_user_error, run, runner

PLAN = SMALL[: SMALL.index("--device")]  # planned for a CUDA device (of --memory's size) even on a CPU machine


def test_plan_as_json_resolves_the_settings_as_a_run_would(tmp_path):
    r = run(*PLAN, "--plan", "--json", "--memory", "80GiB", "--micro-batch", "auto", "--run-dir", tmp_path / "r")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert not (tmp_path / "r").exists()  # nothing trained, no run directory
    assert plan["data"] == {"source": "digits", "channels": 1, "image_size": 8, "num_classes": 10}
    assert (plan["model"], plan["global_batch"], plan["world"], plan["budget"]) == ("2-32-2-1", 16, 1, 80 * GiB)
    assert plan["parameters"] > 0 and plan["flops_per_image"] > 0 and plan["time_per_step_s"] > 0
    assert (plan["micro_batch"], plan["accumulation"], plan["auto_micro_batch"]) == (16, 1, 16)
    assert plan["memory"]["peak"] > 0 and plan["fits"] is True and plan["checkpointing"] == "off"
    assert plan["largest_micro_batch"] == plan["largest_by_checkpointing"]["off"] > 16


def test_plan_lines_at_a_micro_batch_and_a_budget_that_forces_accumulation():
    r = run(
        *PLAN, "--plan", "--memory", "1.2GiB", "--batch-size", "64", "--micro-batch", "8", "--checkpointing", "blocks"
    )
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert out.startswith("data digits: 1x8x8, 10 classes; planned for cuda, memory from --memory\nmodel 2-32-2-1: ")
    assert "micro-batch 8 x 8 accumulation step(s)" in out and "checkpointing blocks" in out
    assert "largest micro-batch that fits" in out and "time per step at " in out


def test_auto_takes_the_largest_divisor_of_the_share_that_fits():
    r = run(*PLAN, "--plan", "--json", "--memory", "1.005GiB", "--batch-size", "60", "--precision", "fp32")
    plan = json.loads(r.stdout)
    fits = plan["largest_micro_batch"]
    assert fits < 60 and fits == largest_micro_batch(
        int(1.005 * GiB), _model(), precision="fp32", checkpointing="off", accumulating=True, device="cuda"
    )
    auto = plan["auto_micro_batch"]
    assert auto == largest_divisor(60, fits)  # what the trainer's `auto` takes (train/micro.py) on such a device
    assert auto <= fits and 60 % auto == 0 and not any(60 % k == 0 for k in range(auto + 1, fits + 1))
    assert plan["auto_accumulation"] == 60 // auto and plan["micro_batch"] == 60  # no --micro-batch: no split


def _model():
    from tarflow_core.config import ModelConfig

    return ModelConfig(1, 8, 2, 32, 2, 1, 16, 4, True, 10)


def test_plan_usage_errors():
    assert_user_error(run("--plan", "--memory", "lots"), "--memory", "'lots'")
    assert_user_error(run("--plan", "--device", "cpu"), "--plan", "--memory SIZE")
    r = run(*SMALL, "--plan", "--memory", "64MiB")  # --device cpu: planned for the CPU, no CUDA overheads
    assert r.exit_code == 0 and "; planned for cpu, memory from --memory" in r.stdout
    assert_user_error(run("--memory", "80GiB"), "--memory goes with --plan")
    assert_user_error(run("--json"), "--json goes with --plan")
    assert_user_error(run("--plan", "--memory", "8GiB", "--batch-size", "16", "--micro-batch", "5"), "--micro-batch 5")


def test_memory_options_at_the_command_line(tmp_path):
    r = run(*SMALL, "--max-steps", "2", "--micro-batch", "4", "--checkpointing", "layers", "--run-dir", tmp_path / "r")
    assert r.exit_code == 0, r.stderr
    assert "global batch 16 in 4 micro-batches of 4" in r.stderr
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["train"]["micro_batch"], cfg["train"]["checkpointing"]) == (4, "layers")
    assert cfg["environment"]["tf32"] is False
    assert_user_error(run(*SMALL, "--micro-batch", "0"), "--micro-batch")
    assert_user_error(run(*SMALL, "--micro-batch", "many"), "--micro-batch", "'auto'")
    assert_user_error(run(*SMALL, "--checkpointing", "all"), "--checkpointing must be one of off, blocks, layers")
    # micro-batch and checkpointing leave the maths as it is: --resume may change them
    r = run("--resume", tmp_path / "r", "--max-steps", "3", "--micro-batch", "auto", "--checkpointing", "off")
    assert r.exit_code == 0, r.stderr
    assert "global batch 16," in r.stderr  # auto off CUDA: the whole share


def test_help_lists_the_memory_options():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    for opt in ("--micro-batch", "--checkpointing", "--plan", "--memory", "--json"):
        assert opt in r.stdout, opt
