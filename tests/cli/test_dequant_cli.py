"""A model with a learned dequantization q(u|x) at the edges: score and eval report its variational
bound and say so (the uniform figure beside it), info shows q, sampling ignores it, and the run's
log line, dashboard and TensorBoard export show both held-out figures. Models without q keep their
output exactly as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tarflow_cli.commands.train import _describe
from tarflow_cli.main import app
from tarflow_cli.tui.app import CHARTS
from tarflow_cli.tui.state import RunState
from tarflow_cli.tui.widgets.line_chart import LineChart
from tarflow_core.checkpoint import load_model, save_checkpoint
from tarflow_core.data import open_dataset
from tarflow_core.likelihood import bpd_figures
from tarflow_core.metrics import dataset_bpd
from tests.conftest import tiny_model

runner = CliRunner()
VARIATIONAL = {"type": "variational", "std": None}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same random flow with a random q (variational) and without (uniform), and 8-bit images."""
    root = tmp_path_factory.mktemp("dequant")
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4), dtype=np.uint8)
    np.save(root / "images.npy", images)
    with_q = tiny_model(seed=5, dtype=torch.float32, dequant="variational", dequant_width=4, dequant_layers=2)
    plain = tiny_model(seed=5, dtype=torch.float32)
    plain.load_state_dict({k: v for k, v in with_q.state_dict().items() if not k.startswith("dequantizer.")})
    data = {"source": str(root / "images.npy"), "channels": 1, "image_size": 4, "num_classes": 0}
    save_checkpoint(root / "variational", with_q, noise=VARIATIONAL, step=3, data=data)
    save_checkpoint(root / "uniform", plain, noise={"type": "uniform", "std": None}, step=3, data=data)
    return root, torch.from_numpy(images).unsqueeze(1)


def records(result) -> list[dict]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_score_reports_the_bound_with_the_uniform_figure_beside_it(ckpts):
    root, x = ckpts
    model = load_model(root / "variational")
    recs = records(run("score", "-c", root / "variational", root / "images.npy", "-f", "jsonl", "--seed", 4))
    assert [list(r) for r in recs] == [["index", "source", "nll", "bpd", "bpd_uniform", "dequant"]] * 12
    assert {r["dequant"] for r in recs} == {"variational"}
    bound, uniform = bpd_figures(
        model, x, dequants=("variational", "uniform"), generator=torch.Generator().manual_seed(4)
    )
    assert np.allclose([r["bpd"] for r in recs], bound.numpy(), atol=1e-5)
    assert np.allclose([r["bpd_uniform"] for r in recs], uniform.numpy(), atol=1e-5)
    assert np.allclose([r["bpd"] for r in recs], [(r["nll"] + np.log(128)) / np.log(2) for r in recs], atol=1e-9)
    asked = records(run("score", "-c", root / "variational", root / "images.npy", "-f", "jsonl", "--seed", 4,
                        "--dequantize", "uniform"))  # fmt: skip
    assert [list(r) for r in asked] == [["index", "source", "nll", "bpd", "dequant"]] * 12
    assert [r["bpd"] for r in asked] == [r["bpd_uniform"] for r in recs] and asked[0]["dequant"] == "uniform"
    twice = records(
        run("score", "-c", root / "variational", root / "images.npy", "-f", "jsonl", "--dequant-samples", 2)
    )
    mean2 = bpd_figures(model, x, dequants=("variational",), generator=torch.Generator().manual_seed(0), samples=2)[0]
    assert np.allclose([r["bpd"] for r in twice], mean2.numpy(), atol=1e-5)
    r = run("score", "-c", root / "variational", root / "images.npy", "-f", "jsonl")
    assert "the variational bound; uniform dequantization" in r.stderr


def test_score_csv_and_table_carry_the_same_fields(ckpts):
    root, _ = ckpts
    r = run("score", "-c", root / "variational", root / "images.npy", "-f", "csv")
    lines = r.stdout.splitlines()
    assert lines[0] == "index,source,nll,bpd,bpd_uniform,dequant" and len(lines) == 13
    assert all(line.endswith(",variational") for line in lines[1:])
    table = run("score", "-c", root / "variational", root / "images.npy", "-f", "table").stdout
    assert "bpd_uniform" in table and "variational" in table


def test_models_without_q_score_as_before_and_cannot_ask_for_q(ckpts):
    root, x = ckpts
    recs = records(run("score", "-c", root / "uniform", root / "images.npy", "-f", "jsonl", "--seed", 4))
    assert [list(r) for r in recs] == [["index", "source", "nll", "bpd"]] * 12
    uniform = bpd_figures(
        load_model(root / "uniform"), x, dequants=("uniform",), generator=torch.Generator().manual_seed(4)
    )
    assert np.allclose([r["bpd"] for r in recs], uniform[0].numpy(), atol=1e-5)
    assert run("score", "-c", root / "uniform", root / "images.npy", "-f", "csv").stdout.splitlines()[0] == (
        "index,source,nll,bpd"
    )
    bad = run("score", "-c", root / "uniform", root / "images.npy", "--dequantize", "variational")
    assert bad.exit_code == 2 and "no learned q(u|x)" in bad.stderr and "--noise variational" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_eval_reports_the_bound_and_the_uniform_figure(ckpts):
    root, _ = ckpts
    r = run("eval", "-c", root / "variational", "--data", root / "images.npy", "--split", "all", "--metrics", "bpd")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["metrics"]) == {"bpd", "bpd_stderr", "nll", "bpd_uniform"}
    assert report["settings"]["dequantize"] == "variational" and "variational bound" in r.stderr
    model = load_model(root / "variational")
    want = dataset_bpd(model, open_dataset(str(root / "images.npy"), "all"), generator=torch.Generator().manual_seed(0))
    assert report["metrics"]["bpd"] == pytest.approx(want.bpd, abs=1e-9)
    assert report["metrics"]["bpd_uniform"] == pytest.approx(want.bpd_uniform, abs=1e-9)
    r = run("eval", "-c", root / "uniform", "--data", root / "images.npy", "--split", "all", "--metrics", "bpd")
    report = json.loads(r.stdout)
    assert set(report["metrics"]) == {"bpd", "bpd_stderr", "nll"} and report["settings"]["dequantize"] == "uniform"


def test_info_shows_q_and_sampling_ignores_it(ckpts, tmp_path):
    root, _ = ckpts
    r = run("info", "--ckpt", root / "variational", "--json")
    d = json.loads(r.stdout)
    assert d["noise"] == VARIATIONAL and d["model"]["dequant"] == "variational"
    assert (
        d["parameters"]
        == load_model(root / "variational").num_parameters()
        > json.loads(run("info", "--ckpt", root / "uniform", "--json").stdout)["parameters"]
    )
    table = run("info", "--ckpt", root / "variational").stdout
    assert "dequantization" in table and "variational: q(u|x) of 2 couplings of width 4" in table
    rows = run("info", "--ckpt", root / "uniform").stdout.splitlines()
    assert not any(row.startswith("dequantization") for row in rows)  # as before for a model without q
    for name in ("variational", "uniform"):
        r = run("sample", "--ckpt", root / name, "-n", 5, "--seed", 2, "--out", tmp_path / f"{name}.npy")
        assert r.exit_code == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "variational.npy"), np.load(tmp_path / "uniform.npy"))


EVAL = {"time": 1.0, "kind": "eval", "step": 40, "bpd": 3.25, "images": 12, "split": "test", "weights": "model"}
VARIATIONAL_EVAL = {**EVAL, "step": 80, "bpd": 3.0, "bpd_uniform": 3.5, "dequant": "variational"}


def test_the_log_line_says_which_bound_and_old_events_read_as_before():
    assert _describe(EVAL) == "step 40: held-out 3.2500 bits/dim (12 images)"
    assert _describe(VARIATIONAL_EVAL) == (
        "step 80: held-out 3.0000 bits/dim (variational bound; uniform dequantization 3.5000) (12 images)"
    )


def test_the_dashboard_shows_the_uniform_figure_only_for_runs_that_have_it(tmp_path):
    state = RunState(tmp_path)
    bpd_chart = next(c for c in CHARTS if c.id == "chart-bpd")
    chart = LineChart(bpd_chart.title, bpd_chart.lines)
    state.apply(EVAL)  # an old run's event
    chart.set_data(state.series)
    assert state.latest["eval_bpd"] == 3.25 and "uniform" not in chart.border_title
    state.apply(VARIATIONAL_EVAL)
    chart.set_data(state.series)
    assert list(state.series["eval_bpd_uniform"].values) == [3.5] and "uniform 3.50" in chart.border_title


def test_tensorboard_gets_the_uniform_figure(tmp_path):
    pytest.importorskip("tensorboard")
    from tarflow_core.tensorboard import TensorBoardExport
    from tests.cli.test_tensorboard import read_back, series

    with TensorBoardExport(tmp_path, tmp_path / "tb") as export:
        export.write_all([EVAL, VARIATIONAL_EVAL])
    acc = read_back(tmp_path / "tb")
    assert series(acc, "eval/bpd") == [(40, 3.25), (80, 3.0)] and series(acc, "eval/bpd_uniform") == [(80, 3.5)]
