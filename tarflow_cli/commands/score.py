"""`tarflow score`: exact per-image negative log-likelihood and bits per dimension."""

from __future__ import annotations

import csv
import math
import sys
from typing import Annotated, Optional

import torch
import typer
from rich.table import Column, Table

from tarflow_core import flow
from tarflow_core.dequant import dequantize as dequantize_images
from tarflow_core.likelihood import classify as bayes_classify
from tarflow_core.likelihood import dequantization, dequantized_nll
from tarflow_core.likelihood import nll as model_nll

from ..console import UsageError, info, out, require_stdout, stdout_is_terminal, to_stdout, user_errors
from ..io import Inputs, read_inputs, strict_json
from ..options import (
    FLAG,
    BatchOpt,
    CkptOpt,
    ClassOpt,
    DeviceOpt,
    LabelsOpt,
    MaxBatchOpt,
    PatchOpt,
    SeedOpt,
    StrictOpt,
    ThreadsOpt,
    inputs_argument,
)
from .common import batches, check_model_inputs, count, load, resolve_device, resolve_labels, skipped_warning
from .numbers import POSITIVE
from .progress import progress_bar

FORMATS = ("jsonl", "csv", "table")
DEQUANTIZE = ("uniform", "variational", "none")
# the fields a model with a learned q(u|x) adds after bpd, in this order (bpd_uniform: variational only)
DEQUANT_FIELDS = ("bpd_uniform", "dequant")

InputsArg = inputs_argument("Image files, folders, .npz, .npy, or - for a .npy on stdin.")
ClassifyOpt = Annotated[
    bool, typer.Option("--classify", metavar=FLAG, help="Also predict the class by Bayes' rule (conditional models).")
]
DequantizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dequantize",
        help="uniform, variational (a model trained with --noise variational: its bound) or none \\[default: "
        "the model's own for 8-bit inputs (variational when it has a learned q(u|x), else uniform), none for "
        "float .npy].",
        show_default=False,
    ),
]
DequantSamplesOpt = Annotated[
    int, typer.Option("--dequant-samples", parser=POSITIVE, help="Average over K dequantization draws.")
]
FormatOpt = Annotated[
    Optional[str],
    typer.Option(
        "--format",
        "-f",
        help="jsonl, csv or table \\[default: table on a terminal, else jsonl].",
        show_default=False,
    ),
]


def score(
    inputs: InputsArg,
    ckpt: CkptOpt,
    class_: ClassOpt = None,
    labels: LabelsOpt = None,
    classify: ClassifyOpt = False,
    dequantize: DequantizeOpt = None,
    dequant_samples: DequantSamplesOpt = 1,
    fmt: FormatOpt = None,
    batch_size: BatchOpt = 256,
    max_batch: MaxBatchOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    patch_size: PatchOpt = None,
    strict: StrictOpt = False,
) -> None:
    """Score images under a checkpoint: one record per image, in input order.

    nll is -log p(x) / D in nats for the x actually scored; bpd = (nll + ln 128) / ln 2. A model
    trained with --noise variational scores its variational bound (nll then adds log q(u|x) / D),
    with bpd_uniform (uniform dequantization, the same draws) and dequant beside.

    Examples:

      tarflow score --ckpt runs/tiny digits/*.png

      tarflow sample --ckpt runs/tiny --out - \\
        | tarflow score --ckpt runs/tiny - --format csv
    """
    with user_errors():
        require_stdout("score")
        fmt = fmt or ("table" if stdout_is_terminal() else "jsonl")
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
        if dequantize not in (None, *DEQUANTIZE):
            raise UsageError(f"--dequantize {dequantize}: expected uniform, variational or none")
        dev = resolve_device(device, threads)
        model, ck = load(ckpt, dev, patch_size)
        if classify and not model.config.conditional:
            raise UsageError(
                f"--classify: checkpoint {ck.path} is unconditional; classification needs a class-conditional model"
            )
        data = read_inputs(inputs, channels=model.config.in_channels, strict=strict)
        check_model_inputs(data, model.config, inputs)
        skipped = skipped_warning(data, "each record's source names its file")
        if skipped:
            info(skipped)
        dequantize = _check_dequantization(data, inputs, dequantize, dequant_samples, model, ck)
        y = resolve_labels(
            ck,
            len(data.images),
            class_=class_,
            labels_path=labels,
            from_inputs=data.labels,
            inputs_name=", ".join(map(str, inputs)),
        )
        draws = dequant_samples if dequantize != "none" else 1
        passes = dict(batch_size=batch_size, max_batch=max_batch)
        records = _score(
            model, data, y, dev, draws=draws, dequantize=dequantize, classify=classify, seed=seed, **passes
        )
        with to_stdout():
            _emit(records, fmt)
        _summarize(records, y, fmt, classify, dequantize, dequant_samples)


def _check_dequantization(
    data: Inputs, inputs: list[str], dequantize: str | None, dequant_samples: int, model, ck
) -> str:
    """--dequantize as given, or chosen by the inputs and the model (for 8-bit images the model's own:
    variational when it has a learned q(u|x), else uniform); refused where it cannot apply."""
    dequantize = dequantize or (dequantization(model) if data.is_uint8 else "none")
    if dequantize == "none" and dequant_samples != 1:
        raise UsageError(
            f"--dequant-samples {dequant_samples} needs --dequantize uniform or variational (these inputs are "
            f"scored {'as given' if not data.is_uint8 else 'without dequantization'})"
        )
    if dequantize != "none" and not data.is_uint8:
        raise UsageError(
            f"--dequantize {dequantize} needs 8-bit images, but {', '.join(inputs)} holds float values; "
            "use --dequantize none"
        )
    if dequantize == "variational" and model.dequantizer is None:
        raise UsageError(
            f"--dequantize variational: checkpoint {ck.path} has no learned q(u|x) (it was not trained with "
            "--noise variational); use --dequantize uniform"
        )
    return dequantize


def _score(
    model,
    data: Inputs,
    y,
    dev,
    *,
    draws: int,
    dequantize: str,
    classify: bool,
    batch_size: int,
    seed: int,
    max_batch: int | None = None,
) -> list[dict]:
    """One record per image: nll and bpd averaged over `draws` dequantizations, and the Bayes
    posterior when classifying; each batch in passes of at most `max_batch` images (or pairs). For a
    model with a learned q(u|x) also `bpd_uniform` (variational: the same draws) and `dequant`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data.images)
    n = len(images)
    records = []
    with progress_bar("scoring", n) as advance, torch.inference_mode():
        for start, stop in batches(n, batch_size):
            xb = images[start:stop]
            yb = y[start:stop].to(dev) if y is not None else None
            nll, uniform_nll, x = _draws(model, xb, yb, data.is_uint8, dequantize, draws, generator, dev, max_batch)
            post = bayes_classify(model, x, max_batch=max_batch).cpu() if classify else None
            for i in range(stop - start):
                rec = {
                    "index": start + i,
                    "source": data.sources[start + i],
                    "nll": float(nll[i]),
                    "bpd": float(flow.nats_to_bpd(nll[i])),
                }
                if uniform_nll is not None:
                    rec["bpd_uniform"] = float(flow.nats_to_bpd(uniform_nll[i]))
                if model.dequantizer is not None:  # which figure `bpd` is; absent for models without q
                    rec["dequant"] = dequantize
                if post is not None:
                    rec["pred"] = int(post[i].argmax())
                    rec["log_probs"] = [float(v) for v in post[i]]
                records.append(rec)
            advance(stop)
    return records


def _draws(model, xb, yb, is_uint8: bool, dequantize: str, draws: int, generator, dev, max_batch):
    """A batch's nll per image averaged over `draws` (float64, CPU), with variational dequantization the
    uniform figure of the same draws too (else None), and the last draw's uniformly dequantized (or
    undequantized) input, which classification scores."""
    kinds = ("variational", "uniform") if dequantize == "variational" else ("uniform",)
    totals = [torch.zeros(len(xb), dtype=torch.float64) for _ in kinds]
    for _ in range(draws):
        if dequantize == "none":
            x = (flow.uint8_to_model(xb) if is_uint8 else xb).to(dev)
            totals[0] += model_nll(model, x, yb, max_batch=max_batch).double().cpu()
            continue
        u = torch.rand(xb.shape, generator=generator, dtype=torch.float32)  # as flow.dequantize_uniform draws
        for total, kind in zip(totals, kinds):
            total += dequantized_nll(model, xb, u, yb, dequant=kind, max_batch=max_batch).double().cpu()
        x = dequantize_images(None, xb, u).x.to(dev)
    nll = [t / draws for t in totals]
    return nll[0], (nll[1] if len(nll) > 1 else None), x


def _summarize(records: list[dict], y, fmt: str, classify: bool, dequantize: str, dequant_samples: int) -> None:
    """The closing lines on stderr: a warning for non-finite scores, then the means."""
    n = len(records)
    broken = sum(not math.isfinite(r["nll"]) for r in records)
    if broken:
        info(
            f"warning: the model gave a non-finite likelihood for {broken} of {n} images "
            f"({'null in JSON' if fmt == 'jsonl' else 'nan'}); its weights may hold nan or inf"
        )
    mean_bpd = sum(r["bpd"] for r in records) / n
    extra = ""
    if classify and y is not None:
        acc = sum(int(r["pred"] == int(t)) for r, t in zip(records, y)) / n
        extra = f", accuracy {acc:.3f} against the given labels"
    draws = f" x{dequant_samples}" if dequantize != "none" else ""
    if dequantize == "variational":  # which bound the mean is, and the uniform figure beside it
        uniform = sum(r["bpd_uniform"] for r in records) / n
        draws += f": the variational bound; uniform dequantization {uniform:.4f}"
    info(
        f"scored {count(n, 'image')}: mean nll {sum(r['nll'] for r in records) / n:.4f} nats/dim, "
        f"mean bpd {mean_bpd:.4f} (dequantize {dequantize}{draws}){extra}"
    )


def _emit(records: list[dict], fmt: str) -> None:
    extra = [f for f in DEQUANT_FIELDS if records and f in records[0]]  # a model with q: which bound bpd is
    if fmt == "jsonl":  # JSON has no nan or inf: a non-finite score is null
        for r in records:
            sys.stdout.write(strict_json(r) + "\n")
    elif fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        k = len(records[0].get("log_probs", [])) if records else 0
        w.writerow(
            ["index", "source", "nll", "bpd"] + extra + (["pred"] + [f"log_prob_{c}" for c in range(k)] if k else [])
        )
        for r in records:
            w.writerow(
                [r["index"], r["source"], f"{r['nll']:.6f}", f"{r['bpd']:.6f}"]
                + [_field(r[f], ".6f") for f in extra]
                + ([r["pred"]] + [f"{v:.6f}" for v in r["log_probs"]] if k else [])
            )
    else:
        table = Table("index", Column("source", overflow="fold"), "nll", "bpd", *extra)  # fold: a path stays whole
        has_pred = bool(records) and "pred" in records[0]
        if has_pred:
            table.add_column("pred")
            table.add_column("p(pred)")
        for r in records:
            row = [str(r["index"]), r["source"], f"{r['nll']:.4f}", f"{r['bpd']:.4f}"]
            row += [_field(r[f], ".4f") for f in extra]
            if has_pred:
                row += [str(r["pred"]), f"{torch.tensor(r['log_probs']).exp().max().item():.3f}"]
            table.add_row(*row)
        out.print(table)
    sys.stdout.flush()


def _field(v, spec: str) -> str:
    """A number in `spec`, a word as it is."""
    return format(v, spec) if isinstance(v, float) else str(v)
