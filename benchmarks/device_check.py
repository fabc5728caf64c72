#!/usr/bin/env python3
"""The device check: one prepared run on one CUDA machine that writes one JSON file of figures.

    python benchmarks/device_check.py --out $OUT/device_check.json [--budget-s 520]
    python benchmarks/device_check.py --device cpu --tiny --out /tmp/dc.json      # every stage, toy sizes

Stages, in order (benchmarks/README.md, "The device check", says what each figure means):
environment, data (a synthetic labelled .npz), cuda_tests, plan, train_eager, sampling, eval_bpd, fid,
reference, train_compiled. Each stage but cuda_tests runs in a child process of this script with a time
limit, so a stage that fails, runs out of memory or hangs costs only itself; the child writes its figures
as it goes (next to --out), and this process merges them and rewrites --out after every stage, so a run
cut short still returns what it measured. A stage starts only when enough of --budget-s remains for it,
else it is recorded as skipped.

Needs only the repository (PYTHONPATH is set to it) and torch: nothing is downloaded. The published code
is compared only when ref/transformer_flow.py is there (the device tool carries ./ref when asked). The
sampling, bpd and FID figures use random weights: they time the code paths, they say nothing about quality.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SCHEMA = "tarflow-device-check/1"
PRESET = "imagenet64-cond"  # the real configuration: 2-768-8-8 at 64x64, 10 classes here, bf16 on CUDA
# (name, seconds it may take at most on the device, the least remaining budget it starts with). Ordered by
# what matters most when the budget runs short; the caps add up to more than the budget on purpose.
STAGES = [
    ("environment", 45, 10),
    ("data", 30, 5),
    ("cuda_tests", 100, 30),
    ("plan", 75, 40),
    ("train_eager", 90, 45),
    ("sampling", 150, 60),
    ("eval_bpd", 40, 15),
    ("fid", 45, 15),
    ("reference", 100, 45),  # skipped at once unless ./ref was carried, which asks for it: before compiling
    ("train_compiled", 200, 90),
]
CUDA_ONLY = {"cuda_tests"}
CUDA_TEST_FILES = ["tests/core/test_static_sampling.py", "tests/core/test_parallel_sampling.py"]
OPTIONAL_MODULES = ["numpy", "PIL", "safetensors", "typer", "rich", "textual", "pytest"]
RANDOM_WEIGHTS = "random weights (proj_out ~ N(0, 0.02) so the flow is not the identity): timing only"


def sizes(tiny: bool) -> dict:
    """Problem sizes: the real configuration on the device, toy ones for --tiny (a CPU in seconds)."""
    if tiny:
        arch = dict(patch_size=4, width=64, num_blocks=2, layers_per_block=2, head_dim=64)  # the published head size
        return dict(img=16, n_train=128, n_test=32, classes=10, arch=arch, batch=16, steps=3, plan_steps=2,
                    sample_batch=4, denoise_max_batch=2, fid_size=75, fid_real=4, matmul=512)  # fmt: skip
    return dict(img=64, n_train=4096, n_test=256, classes=10, arch={}, batch=256, steps=8, plan_steps=2,
                sample_batch=64, denoise_max_batch=16, fid_size=299, fid_real=256, matmul=8192)  # fmt: skip


# ================================================================================ the parent process


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        return run_child(args)
    return run_all(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-check")) / "device_check.json")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 520; 150 with --tiny)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every stage in about a minute on a CPU")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--only", default=None, help="comma-separated stage names to run (the others are skipped)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child mode: run this one stage
    p.add_argument("--stage-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_all(args: argparse.Namespace) -> int:
    budget = args.budget_s or (150.0 if args.tiny else 520.0)
    start = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="tarflow-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    report = {
        "schema": SCHEMA,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "budget_s": budget,
            "device": args.device,
            "tiny": args.tiny,
            "preset": PRESET,
            "sizes": sizes(args.tiny),
        },  # fmt: skip
        "stages": {},
    }
    ctx = {"device": args.device, "tiny": args.tiny, "work": str(work)}
    try:
        for name, cap, least in STAGES:
            left = budget - (time.monotonic() - start)
            entry = skip_entry(name, ctx, left, least, only)
            if entry is None:
                entry = run_stage(name, args, ctx, min(cap if not args.tiny else 60, left))
            report["stages"][name] = entry
            after_stage(name, entry, ctx, report)
            remove_runs(work)
            report["elapsed_s"] = round(time.monotonic() - start, 1)
            write_json(args.out, report)
            print(f"[{report['elapsed_s']:6.1f}s] {name}: {summary(entry)}", flush=True)
    finally:
        remove_runs(work)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def remove_runs(work: Path) -> None:
    """The run directories a stage's child left in /dev/shm (a run stopped by its time limit keeps its
    checkpoint, GBs of RAM there); they are named after this check's scratch folder."""
    for path in Path("/dev/shm").glob(f"{work.name}-run-*"):
        shutil.rmtree(path, ignore_errors=True)


def skip_entry(name: str, ctx: dict, left: float, least: float, only) -> dict | None:
    """A `skipped` entry when the stage cannot or need not run; None when it should run."""
    if only is not None and name not in only:
        return {"status": "skipped", "reason": "not in --only"}
    least = least if not ctx["tiny"] else min(least, 5)
    if left < least:
        return {"status": "skipped", "reason": f"budget: {left:.0f} s left, the stage needs {least} s at least"}
    if name != "environment" and ctx.get("device_resolved") is None:
        return {"status": "skipped", "reason": "the environment stage did not resolve the device"}
    if name in CUDA_ONLY and ctx["device_resolved"] != "cuda":
        return {"status": "skipped", "reason": "skipped: no CUDA"}
    needs_data = name not in ("environment", "data", "cuda_tests", "reference")
    if needs_data and not ctx.get("npz"):
        return {"status": "skipped", "reason": "no synthetic data (the data stage failed)"}
    if name == "reference" and not (REPO / "ref" / "transformer_flow.py").is_file():
        return {"status": "skipped", "reason": "ref/transformer_flow.py is not here (carry ['ref'] to compare)"}
    if name == "cuda_tests" and importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed on this machine"}
    return None


def run_stage(name: str, args: argparse.Namespace, ctx: dict, limit: float) -> dict:
    """Run one stage in a child process (cuda_tests: pytest) within `limit` seconds; its entry."""
    t0 = time.monotonic()
    if name == "cuda_tests":
        entry = run_cuda_tests(limit)
    else:
        partial = args.out.parent / f"{args.out.stem}.{name}.partial.json"
        partial.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--stage-out", str(partial),
               "--device", ctx.get("device_resolved") or args.device, "--work", ctx["work"]]  # fmt: skip
        cmd += ["--tiny"] if args.tiny else []
        rc, out_tail, timed_out = run_limited(cmd, limit)
        entry = read_json(partial) or {}
        for path in (partial, partial.with_name(partial.name + ".tmp")):  # a child killed mid-write leaves .tmp
            path.unlink(missing_ok=True)
        entry.setdefault("figures", {})
        if timed_out:
            entry.update(status="timeout", reason=f"stopped after its {limit:.0f} s limit (figures so far kept)")
        elif rc != 0 and entry.get("status") != "error":
            entry.update(status="error", error=f"child exited with {rc}", log_tail=out_tail)
        elif entry.get("status") == "error":
            entry["log_tail"] = out_tail
        entry.setdefault("status", "ok")
    entry["seconds"] = round(time.monotonic() - t0, 1)
    entry["limit_s"] = round(limit, 1)
    return entry


def run_limited(cmd: list[str], limit: float) -> tuple[int, str, bool]:
    """(exit status, the last 3000 characters of its output, whether it ran out of time). The child gets
    its own process group, so what it started goes with it when the time is up."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, limit)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
        log.seek(0)
        return rc, log.read()[-3000:], timed_out


def run_cuda_tests(limit: float) -> dict:
    """pytest on the CUDA test files (their CUDA cases skip on CPUs); counts and the skip reasons."""
    # addopts cleared: the project's -q plus ours would hide the counts line
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-rs", *CUDA_TEST_FILES]
    rc, tail, timed_out = run_limited(cmd, limit)
    counts, skips = pytest_counts(tail)
    figures = {"files": CUDA_TEST_FILES, "counts": counts, "skip_reasons": skips[:20], "exit_status": rc}
    if timed_out:
        return {"status": "timeout", "figures": figures, "reason": f"pytest ran past {limit:.0f} s", "log_tail": tail}
    ok = rc == 0 and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    return {"status": "ok" if ok else "error", "figures": figures, **({} if ok else {"log_tail": tail})}


def pytest_counts(output: str) -> tuple[dict, list[str]]:
    """({outcome: count} from pytest's last summary line, the SKIPPED lines of -rs)."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)", line)]
    counts = (
        {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])}
        if lines
        else {}
    )
    return counts, [line.strip() for line in output.splitlines() if line.startswith("SKIPPED")]


def after_stage(name: str, entry: dict, ctx: dict, report: dict) -> None:
    """What later stages need from this one, and the figures that combine stages (MFU)."""
    figures = entry.get("figures", {})
    if name == "environment":
        ctx["device_resolved"] = figures.get("device")
        ctx["peak_tflops"] = figures.get("bf16_matmul_tflops")
    if name == "data" and entry.get("status") == "ok":
        ctx["npz"] = figures.get("path")
    if name.startswith("train_") and figures.get("tflops") and ctx.get("peak_tflops"):
        figures["mfu"] = round(figures["tflops"] / ctx["peak_tflops"], 4)
        figures["mfu_against"] = f"the measured bf16 matmul peak, {ctx['peak_tflops']:.4g} TFLOP/s"


def summary(entry: dict) -> str:
    status = entry.get("status")
    if status == "skipped":
        return f"skipped ({entry.get('reason')})"
    detail = entry.get("error") or entry.get("reason") or ""
    return f"{status} in {entry.get('seconds')} s" + (f": {detail}" if detail else "")


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or a cut-off run) sees the previous complete file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ================================================================================= the child process


class Stage:
    """The figures of one stage in a child process, written to --stage-out after every change."""

    def __init__(self, path: Path):
        self.path, self.entry = path, {"status": "running", "figures": {}}

    def put(self, **figures) -> None:
        self.entry["figures"].update(figures)
        write_json(self.path, self.entry)

    def end(self, status: str = "ok", **fields) -> None:
        self.entry.update(status=status, **fields)
        write_json(self.path, self.entry)


def run_child(args: argparse.Namespace) -> int:
    stage = Stage(args.stage_out)
    stage.put()
    ctx = {"device": args.device, "tiny": args.tiny, "work": Path(args.work), "sizes": sizes(args.tiny)}
    try:
        result = CHILD_STAGES[args.stage](stage, ctx)
        stage.end(**(result or {}))
    except Exception as e:  # noqa: BLE001 - a stage records its own failure; the parent goes on
        import traceback

        stage.end("error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
        return 1
    return 0


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stage_environment(stage: Stage, ctx: dict) -> None:
    import torch

    want = ctx["device"]
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if want == "auto" else want
    if device == "cuda" and not cuda:
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    modules = {m: importlib.util.find_spec(m) is not None for m in OPTIONAL_MODULES}
    stage.put(device=device, python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
              cudnn=torch.backends.cudnn.version() if cuda else None, cuda_available=cuda, cpu_count=os.cpu_count(),
              modules=modules)  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        stage.put(device_name=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                  multiprocessors=props.multi_processor_count, driver=nvidia_smi())  # fmt: skip
    n = ctx["sizes"]["matmul"]
    stage.put(bf16_matmul_n=n, bf16_matmul_tflops=float(f"{matmul_tflops(device, n, torch.bfloat16):.4g}"))
    try:  # last: the figures above stand even when the project itself does not import
        import tarflow_core

        stage.put(tarflow=getattr(tarflow_core, "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - recorded; the stages that need it record their own errors
        stage.put(tarflow=f"import failed: {type(e).__name__}: {e}")


def nvidia_smi() -> str | None:
    try:
        q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"]
        return subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def matmul_tflops(device: str, n: int, dtype) -> float:
    """The sustained rate of n x n matmuls (median of 5 timings of 10 back-to-back products): the peak the
    MFU figures are measured against, on this device now, rather than a datasheet's number."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(6):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        if i:  # the first round is the warm-up (kernel selection, clocks)
            times.append((time.perf_counter() - t0) / 10)
    return 2 * n**3 / statistics.median(times) / 1e12


def stage_data(stage: Stage, ctx: dict) -> None:
    """A labelled 64x64x3 .npz (x_train/y_train, x_test/y_test): per class a mean colour and a gradient,
    plus noise, so the images are not all alike. Generated with numpy in seconds."""
    import numpy as np

    s, t0 = ctx["sizes"], time.perf_counter()
    rng = np.random.default_rng(0)
    ramp = np.linspace(-40, 40, s["img"], dtype=np.float32)

    def images(n: int) -> tuple:
        y = rng.integers(0, s["classes"], n)
        colour = rng.uniform(60, 200, (s["classes"], 3)).astype(np.float32)[y]
        x = colour[:, None, None, :] + ramp[None, :, None, None] * (y % 2 * 2 - 1)[:, None, None, None]
        x = x + rng.normal(0, 25, (n, s["img"], s["img"], 3)).astype(np.float32)
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    (xa, ya), (xb, yb) = images(s["n_train"]), images(s["n_test"])
    path = ctx["work"] / "synthetic64.npz"
    np.savez(path, x_train=xa, y_train=ya, x_test=xb, y_test=yb)
    stage.put(path=str(path), train_images=len(xa), test_images=len(xb), shape=list(xa.shape[1:]),
              classes=s["classes"], bytes=path.stat().st_size, seconds=round(time.perf_counter() - t0, 2))  # fmt: skip


def run_config(ctx: dict, **changes):
    """The imagenet64-cond preset on the synthetic data (toy architecture with --tiny): no previews, no
    evaluation, one checkpoint at the end, log lines every step (the per-step timings)."""
    from tarflow_core.presets import preset

    s = ctx["sizes"]
    base = dict(data=str(ctx["work"] / "synthetic64.npz"), img_size=s["img"], batch_size=s["batch"],
                max_steps=s["steps"], log_every=1, eval_every=0, sample_every=0, checkpoint_every=0,
                keep_checkpoints=1, workers=0 if ctx["tiny"] else 4, device=ctx["device"], micro_batch="auto",
                run_dir=str(run_parent(ctx) / f"{ctx['work'].name}-run-{time.monotonic_ns()}"),
                **s["arch"])  # fmt: skip
    base.update(changes)
    return preset(PRESET).replace(**base)


def run_parent(ctx: dict) -> Path:
    """Where runs write their final checkpoint (GBs at the real size, removed after): /dev/shm when it has
    room, as the save at the end of every run then costs seconds rather than a disk write."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 16 * 2**30:
            return shm
    except OSError:
        pass
    return ctx["work"]


def train_run(stage: Stage, ctx: dict, cfg) -> dict:
    """Train `cfg` through the core API (`tarflow_core.train.train`, what `tarflow train` calls), timing
    each event; the figures of the run, also put into `stage` as they come."""
    import torch

    from tarflow_core.train import train

    t0, steps, start = time.perf_counter(), [], {}

    def emit(event: dict) -> None:
        at = time.perf_counter() - t0
        if event["kind"] == "start":
            start.update(event)
            stage.put(setup_s=round(at, 2), micro_batch=event.get("micro_batch"),
                      accumulation=event.get("accumulation"), memory_plan_bytes=event.get("memory_plan_bytes"),
                      parameters=event.get("parameters"), precision=event.get("precision"),
                      micro_batch_note=event.get("micro_batch_note"))  # fmt: skip
        elif event["kind"] == "train":
            steps.append(dict(at=round(at, 3), images_per_s=event["images_per_s"], memory_mb=event["memory_mb"]))
            stage.put(time_to_first_step_s=steps[0]["at"], steps=steps)
        elif event["kind"] == "end":  # after the final checkpoint's save
            stage.put(end_s=round(at, 2))

    if torch.device(cfg.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, emit=emit)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the checkpoint (GBs at the real size) is not needed
    figures = dict(status=result.status, reason=result.reason, steps_done=result.step, api="tarflow_core.train.train")
    if torch.device(cfg.device).type == "cuda":
        figures.update(max_allocated_bytes=torch.cuda.max_memory_allocated(),
                       max_reserved_bytes=torch.cuda.max_memory_reserved())  # fmt: skip
    stage.put(**figures)
    return {**stage.entry["figures"], "start": start}


def stage_train(stage: Stage, ctx: dict, compiled: bool) -> dict | None:
    """Training at the plan's largest micro-batch (`--micro-batch auto`), eager or compiled: steady
    images/s (median over the steps after the first; after the first two when compiled, as shapes settle),
    TFLOP/s as the trainer counts them (3x the forward FLOPs per image), peak memory, time to first step."""
    cfg = run_config(ctx, compile=compiled)
    if compiled and ctx["device"] != "cuda":
        eager_backend(stage)
    stage.put(compile=compiled, global_batch=cfg.batch_size, max_steps=cfg.max_steps, data="synthetic .npz",
              note="through the core API (the CLI's train calls the same function)")  # fmt: skip
    figures = train_run(stage, ctx, cfg)
    if figures.get("status") != "finished":
        return {"status": "error", "error": f"the run ended {figures.get('status')}: {figures.get('reason')}"}
    steady = [s["images_per_s"] for s in figures.get("steps", [])][2 if compiled else 1 :]
    if not steady:
        return {"status": "error", "error": f"too few steps timed ({figures.get('steps_done')})"}
    ips = statistics.median(steady)
    flops = flops_per_image(ctx, figures["start"])
    peak_mb = max(s["memory_mb"] for s in figures["steps"])
    stage.put(images_per_s=round(ips, 2), tflops=float(f"{3 * flops * ips / 1e12:.4g}"), forward_flops_per_image=flops,
              peak_memory_bytes=int(peak_mb * 2**20),
              peak_memory_kind="cuda max_memory_allocated" if ctx["device"] == "cuda" else "process RSS")  # fmt: skip
    return None


def eager_backend(stage: Stage) -> None:
    """Off CUDA, torch.compile with the `eager` backend: dynamo traces the trainer's model as on the device,
    without inductor's C++ build, which takes minutes on a small CPU (the trainer calls torch.compile)."""
    import functools

    import torch

    torch.compile = functools.partial(torch.compile, backend="eager")
    stage.put(compile_backend="eager (off CUDA: dynamo only; the device uses inductor)")


def flops_per_image(ctx: dict, start: dict) -> float:
    from tarflow_core.config import ModelConfig

    return ModelConfig(**start["model"]).flops_per_image()


def stage_plan(stage: Stage, ctx: dict) -> None:
    """`train --plan` for the real configuration, through the CLI when its packages are here (and the core
    API in any case), then one short run at the plan's micro-batch: the measured peak against the plan."""
    from tarflow_core import memory
    from tarflow_core.train.plan import plan_for

    cuda = ctx["device"] == "cuda"
    cfg = run_config(ctx, max_steps=ctx["sizes"]["plan_steps"])
    budget = None if cuda else 80 * memory.GiB  # off CUDA the plan is for the CPU, sized at 80 GiB
    plan = plan_for(cfg, budget).to_dict()
    p = {k: plan[k] for k in ("model", "parameters", "flops_per_image", "global_batch", "precision", "budget",
                              "micro_batch", "accumulation", "largest_micro_batch", "largest_by_checkpointing",
                              "auto_micro_batch", "auto_accumulation", "time_per_step_s", "device")}  # fmt: skip
    stage.put(plan=p, plan_peak_bytes=plan["memory"]["peak"], plan_api="tarflow_core.train.plan.plan_for")
    stage.put(cli=cli_plan(cfg, budget, plan))
    if not cuda:
        stage.put(measured="skipped: no CUDA (a CPU's peak RSS is not what the plan counts)")
        return
    micro = plan["auto_micro_batch"]
    run = train_run(stage, ctx, cfg.replace(micro_batch=micro))
    from tarflow_core.config import ModelConfig

    start = run["start"]
    model_cfg = ModelConfig(**start["model"])
    # the plan without the CUDA context and fragmentation allowance: what torch's allocator should report
    allocator = memory.training_memory(model_cfg, micro, start["precision"], cfg.checkpointing, False,
                                       accumulating=start["accumulation"] > 1, device="cpu").peak  # fmt: skip
    measured = run.get("max_allocated_bytes")
    stage.put(measured_micro_batch=micro, plan_peak_at_micro_bytes=start.get("memory_plan_bytes"),
              plan_allocator_bytes=allocator, measured_max_allocated_bytes=measured,
              measured_max_reserved_bytes=run.get("max_reserved_bytes"),
              measured_over_plan_allocator=round(measured / allocator, 3) if measured else None,
              device_total_bytes=plan["budget"])  # fmt: skip


def cli_plan(cfg, budget, core_plan: dict) -> dict:
    """`tarflow train --plan --json` in a subprocess when typer and rich are installed; whether it agrees."""
    missing = [m for m in ("typer", "rich") if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "reason": f"CLI packages missing ({', '.join(missing)}): core API used"}
    s = cfg
    cmd = [sys.executable, "-m", "tarflow_cli", "train", "--preset", PRESET, "--data", s.data,
           "--image-size", str(s.img_size), "--batch-size", str(s.batch_size), "--patch-size", str(s.patch_size),
           "--width", str(s.width), "--blocks", str(s.num_blocks), "--layers-per-block", str(s.layers_per_block),
           "--head-dim", str(s.head_dim), "--device", s.device, "--micro-batch", "auto", "--plan",
           "--json"]  # fmt: skip
    cmd += ["--memory", str(budget)] if budget else []
    out = None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
        got = json.loads(out.stdout)
    except (subprocess.SubprocessError, ValueError) as e:
        said = (out.stderr or out.stdout)[-800:] if out is not None else ""
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:300], "output_tail": said}
    keys = ("auto_micro_batch", "largest_micro_batch", "parameters")
    agree = all(got.get(k) == core_plan.get(k) for k in keys) and got["memory"]["peak"] == core_plan["memory"]["peak"]
    return {"status": "ok", "agrees_with_core": agree, **{k: got.get(k) for k in keys}}


def model_config(ctx: dict):
    """The run's architecture for the synthetic data (3 channels, 10 classes)."""
    return run_config(ctx).model_config(3, ctx["sizes"]["img"], ctx["sizes"]["classes"])


def random_model(ctx: dict, seed: int = 0):
    """The run's architecture (10 classes) with random weights on the device, proj_out randomised (its
    default is zero, which makes every block the identity and Jacobi sampling trivially fast)."""
    import torch

    from tarflow_core.model import TarFlow

    cfg = model_config(ctx)
    torch.manual_seed(seed)
    with torch.device(ctx["device"]):
        model = TarFlow(cfg)
        with torch.no_grad():
            for block in model.blocks:
                block.proj_out.weight.normal_(0.0, 0.02)
    return model.eval()


SAMPLING_CASES = [  # (name, sampler, CUDA graphs, denoise), the slowest (no graphs) last
    ("auto", "auto", True, False),
    ("sequential", "sequential", True, False),
    ("auto_denoise", "auto", True, True),
    ("auto_no_graphs", "auto", False, False),
    ("sequential_no_graphs", "sequential", False, False),
    ("sequential_denoise", "sequential", True, True),
]


def stage_sampling(stage: Stage, ctx: dict) -> None:
    """`generate` at batch 64, guidance 2 (bf16 on CUDA, as `tarflow sample` defaults): per case a first
    call (calibration of auto's segments, graph capture) and a timed second call with those segments."""
    import torch

    model, s, cuda = random_model(ctx), ctx["sizes"], ctx["device"] == "cuda"
    batch, sigma = s["sample_batch"], run_config(ctx).noise_std
    stage.put(weights=RANDOM_WEIGHTS, batch=batch, guidance=2.0, precision="bf16" if cuda else "fp32",
              denoise_sigma=sigma, denoise_max_batch=s["denoise_max_batch"], cases={})  # fmt: skip
    cases = stage.entry["figures"]["cases"]
    for name, sampler, graphs, denoise in SAMPLING_CASES:
        if graphs and not cuda and not denoise:  # the denoising cases run on CPUs without graphs
            cases[name] = "skipped: no CUDA (CUDA graphs)"
            continue
        options = dict(batch_size=batch, guidance=2.0, sampler=sampler, precision="bf16" if cuda else "fp32",
                       cuda_graphs=graphs if cuda else None, denoise_sigma=sigma if denoise else None,
                       max_batch=s["denoise_max_batch"] if denoise else None)  # fmt: skip
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first_s, result = timed_generate(model, batch, options, ctx["device"])
        seconds = first_s
        if sampler == "auto" or graphs or not cuda:  # a warm second call; sequential without graphs is
            # warm already from the cases before it (the same kernels), and it is the slowest: once
            options["segments"] = result.settings.get("segments") if sampler == "auto" else None
            seconds, result = timed_generate(model, batch, options, ctx["device"])
        settings = result.settings
        cases[name] = dict(seconds=round(seconds, 3), first_call_s=round(first_s, 3),
                           images_per_s=round(batch / seconds, 2), sampler_used=settings.get("sampler"),
                           segments=settings.get("segments"), passes_per_block=settings.get("passes_per_block"),
                           fallbacks=settings.get("sequential_fallbacks"), cuda_graphs=settings.get("cuda_graphs"),
                           redrawn=result.redrawn, finite=bool(torch.isfinite(result.images).all()),
                           peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None)  # fmt: skip
        stage.put(cases=cases)
        if not denoise and not (ctx["work"] / "samples.pt").exists():  # the FID stage's generated images
            torch.save({"images": result.images, "labels": result.labels}, ctx["work"] / "samples.pt")


def timed_generate(model, num: int, options: dict, device: str):
    import torch

    from tarflow_core.sampling import generate

    sync(device)
    t0 = time.perf_counter()
    result = generate(model, num, generator=torch.Generator().manual_seed(0), **options)
    sync(device)
    return time.perf_counter() - t0, result


def stage_eval_bpd(stage: Stage, ctx: dict) -> None:
    """Bits per dimension of the synthetic test split (`metrics.dataset_bpd`, what `tarflow eval` runs)."""
    import torch

    from tarflow_core.data import open_dataset
    from tarflow_core.metrics import dataset_bpd

    model, test = random_model(ctx), open_dataset(str(ctx["work"] / "synthetic64.npz"), "test")
    stage.put(weights=RANDOM_WEIGHTS, images=len(test), precision=str(model.var.dtype).removeprefix("torch."))
    sync(ctx["device"])
    t0 = time.perf_counter()
    res = dataset_bpd(model, test, batch_size=64, generator=torch.Generator().manual_seed(0))
    sync(ctx["device"])
    seconds = time.perf_counter() - t0
    stage.put(bpd=res.bpd, conditioned=res.conditioned, seconds=round(seconds, 3),
              images_per_s=round(len(test) / seconds, 2), api="tarflow_core.metrics.dataset_bpd")  # fmt: skip


def stage_fid(stage: Stage, ctx: dict) -> None:
    """FID's code path with a random-weight Inception (the real weights cannot be downloaded here): the
    synthetic test images against the sampling stage's samples (or the test split's two halves)."""
    import torch

    from tarflow_core.data import open_dataset
    from tarflow_core.metrics import fid_from_stats, image_stats, load_inception
    from tarflow_core.metrics.common import ordered_batches
    from tarflow_core.metrics.samples import to_uint8

    size = ctx["sizes"]["fid_size"]
    net, tag = load_inception("random:0", device=ctx["device"], size=size, download=False)
    test = open_dataset(str(ctx["work"] / "synthetic64.npz"), "test")
    real = [torch.cat([x for x, _ in ordered_batches(test, 64)])[: ctx["sizes"]["fid_real"]]]
    path = ctx["work"] / "samples.pt"
    if path.is_file():
        fake, against = [to_uint8(torch.load(path)["images"])], "the sampling stage's samples"
    else:
        half = len(real[0]) // 2
        real, fake, against = [real[0][:half]], [real[0][half:]], "the other half of the test split"
    stage.put(inception=tag, input_size=size, against=against,
              note="random Inception weights: a timing and plumbing figure, not comparable to any FID")  # fmt: skip
    sync(ctx["device"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        a = image_stats(net, (x.to(ctx["device"]) for x in real))
        b = image_stats(net, (x.to(ctx["device"]) for x in fake))
    sync(ctx["device"])
    seconds, n = time.perf_counter() - t0, sum(len(x) for x in real + fake)
    t0 = time.perf_counter()
    fid = fid_from_stats(a, b)  # few images: the low-rank form, no 2048 x 2048 eigen-decomposition
    stage.put(fid=float(fid), images=n, features_s=round(seconds, 3), images_per_s=round(n / seconds, 2),
              distance_s=round(time.perf_counter() - t0, 3))  # fmt: skip


def stage_reference(stage: Stage, ctx: dict) -> None:
    """The published `Model.reverse` against ours (sequential and auto) at batch 64, guidance 2, on the same
    random weights and noise: seconds, and the largest image difference from our sequential sampler."""
    import torch

    sys.path.insert(0, str(BENCH))
    from compare_reference import random_pair
    from reference_code import import_reference

    from tarflow_core.sampling import InversionStats, sample

    cuda, s = ctx["device"] == "cuda", ctx["sizes"]
    cfg = model_config(ctx)
    with torch.device(ctx["device"]):
        ref, ours = random_pair(import_reference(REPO / "ref"), cfg, 0)
    ref, ours = ref.eval(), ours.eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(s["sample_batch"], cfg.num_patches, cfg.token_dim, generator=g).to(ctx["device"])
    y = torch.randint(cfg.num_classes, (s["sample_batch"],), generator=g).to(ctx["device"])
    half = torch.autocast(ctx["device"], dtype=torch.bfloat16, enabled=cuda)
    stage.put(weights=RANDOM_WEIGHTS, batch=s["sample_batch"], guidance=2.0, precision="bf16" if cuda else "fp32")
    out, segments = {}, None
    # each of ours twice (the first warms up: graph capture, auto's calibration); the reference once, warm
    # from ours (the same kernels); the figures against it as soon as it has run
    for key in ("sequential_first", "sequential", "reference", "auto_first", "auto"):
        name, stats = key.removesuffix("_first"), InversionStats()
        sync(ctx["device"])
        t0 = time.perf_counter()
        with torch.inference_mode(), half:
            if name == "reference":
                img = ref.reverse(noise.clone(), y, guidance=2.0)
            else:
                options = dict(sampler=name, segments=segments if key == "auto" else None, stats=stats)
                img = sample(ours, noise, y, guidance=2.0, **options)
        sync(ctx["device"])
        out[key] = (time.perf_counter() - t0, img.float())
        segments = list(stats.segments) if key == "auto_first" else segments
        stage.put(**{f"{key}_s": round(out[key][0], 3)})
        if name == "reference" or key == "auto":
            ratio = out["reference"][0] / out[key.replace("reference", "sequential")][0]
            diff = float((out[key][1] - out["sequential"][1]).abs().max())
            stage.put(**{f"reference_over_{key.replace('reference', 'sequential')}": round(ratio, 2),
                         f"max_abs_diff_{key}_vs_sequential": diff})  # fmt: skip
    stage.put(auto_segments=segments)


CHILD_STAGES = {
    "environment": stage_environment,
    "data": stage_data,
    "plan": stage_plan,
    "train_eager": lambda stage, ctx: stage_train(stage, ctx, compiled=False),
    "train_compiled": lambda stage, ctx: stage_train(stage, ctx, compiled=True),
    "sampling": stage_sampling,
    "eval_bpd": stage_eval_bpd,
    "fid": stage_fid,
    "reference": stage_reference,
}

if __name__ == "__main__":
    sys.exit(main())
