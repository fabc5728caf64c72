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
from tarflow_core.likelihood import classify as bayes_classify
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

InputsArg = inputs_argument("Image files, folders, .npz, .npy, or - for a .npy on stdin.")
ClassifyOpt = Annotated[
    bool, typer.Option("--classify", metavar=FLAG, help="Also predict the class by Bayes' rule (conditional models).")
]
DequantizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dequantize",
        help="uniform or none \\[default: uniform for 8-bit inputs, none for float .npy].",
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

    nll is -log p(x) / D in nats for the x actually scored; bpd = (nll + ln 128) / ln 2.

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
        if dequantize not in (None, "uniform", "none"):
            raise UsageError(f"--dequantize {dequantize}: expected uniform or none")
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
        dequantize = _check_dequantization(data, inputs, dequantize, dequant_samples)
        y = resolve_labels(
            ck,
            len(data.images),
            class_=class_,
            labels_path=labels,
            from_inputs=data.labels,
            inputs_name=", ".join(map(str, inputs)),
        )
        draws = dequant_samples if dequantize == "uniform" else 1
        passes = dict(batch_size=batch_size, max_batch=max_batch)
        records = _score(
            model, data, y, dev, draws=draws, dequantize=dequantize, classify=classify, seed=seed, **passes
        )
        with to_stdout():
            _emit(records, fmt)
        _summarize(records, y, fmt, classify, dequantize, dequant_samples)


def _check_dequantization(data: Inputs, inputs: list[str], dequantize: str | None, dequant_samples: int) -> str:
    """--dequantize as given, or chosen by the inputs (uniform for 8-bit images); refused where it
    cannot apply."""
    dequantize = dequantize or ("uniform" if data.is_uint8 else "none")
    if dequantize == "none" and dequant_samples != 1:
        raise UsageError(
            f"--dequant-samples {dequant_samples} needs --dequantize uniform (these inputs are "
            f"scored {'as given' if not data.is_uint8 else 'without dequantization'})"
        )
    if dequantize == "uniform" and not data.is_uint8:
        raise UsageError(
            f"--dequantize uniform needs 8-bit images, but {', '.join(inputs)} holds float values; "
            "use --dequantize none"
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
    posterior when classifying; each batch in passes of at most `max_batch` images (or pairs)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data.images)
    n = len(images)
    records = []
    with progress_bar("scoring", n) as advance, torch.inference_mode():
        for start, stop in batches(n, batch_size):
            xb = images[start:stop]
            yb = y[start:stop].to(dev) if y is not None else None
            total = torch.zeros(stop - start, dtype=torch.float64)
            for _ in range(draws):
                if dequantize == "uniform":
                    x = flow.dequantize_uniform(xb, generator=generator)
                elif data.is_uint8:
                    x = flow.uint8_to_model(xb)
                else:
                    x = xb
                x = x.to(dev)
                total += model_nll(model, x, yb, max_batch=max_batch).double().cpu()
            nll = total / draws
            post = bayes_classify(model, x, max_batch=max_batch).cpu() if classify else None
            for i in range(stop - start):
                rec = {
                    "index": start + i,
                    "source": data.sources[start + i],
                    "nll": float(nll[i]),
                    "bpd": float(flow.nats_to_bpd(nll[i])),
                }
                if post is not None:
                    rec["pred"] = int(post[i].argmax())
                    rec["log_probs"] = [float(v) for v in post[i]]
                records.append(rec)
            advance(stop)
    return records


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
    draws = f" x{dequant_samples}" if dequantize == "uniform" else ""
    info(
        f"scored {count(n, 'image')}: mean nll {sum(r['nll'] for r in records) / n:.4f} nats/dim, "
        f"mean bpd {mean_bpd:.4f} (dequantize {dequantize}{draws}){extra}"
    )


def _emit(records: list[dict], fmt: str) -> None:
    if fmt == "jsonl":  # JSON has no nan or inf: a non-finite score is null
        for r in records:
            sys.stdout.write(strict_json(r) + "\n")
    elif fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        k = len(records[0].get("log_probs", [])) if records else 0
        w.writerow(["index", "source", "nll", "bpd"] + (["pred"] + [f"log_prob_{c}" for c in range(k)] if k else []))
        for r in records:
            w.writerow(
                [r["index"], r["source"], f"{r['nll']:.6f}", f"{r['bpd']:.6f}"]
                + ([r["pred"]] + [f"{v:.6f}" for v in r["log_probs"]] if k else [])
            )
    else:
        table = Table("index", Column("source", overflow="fold"), "nll", "bpd")  # fold: a path stays whole
        has_pred = bool(records) and "pred" in records[0]
        if has_pred:
            table.add_column("pred")
            table.add_column("p(pred)")
        for r in records:
            row = [str(r["index"]), r["source"], f"{r['nll']:.4f}", f"{r['bpd']:.4f}"]
            if has_pred:
                row += [str(r["pred"]), f"{torch.tensor(r['log_probs']).exp().max().item():.3f}"]
            table.add_row(*row)
        out.print(table)
    sys.stdout.flush()
