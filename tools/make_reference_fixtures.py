"""Build the reference-compatibility fixtures in tests/fixtures/reference/ with the published code.

Usage (from the repository root)::

    mkdir -p ref && git -C /work/.mirror/apple+ml-tarflow/repo show HEAD:transformer_flow.py > ref/transformer_flow.py
    python tools/make_reference_fixtures.py --ref ref [--out tests/fixtures/reference]

`--ref` is the folder holding the published `transformer_flow.py` (apple/ml-tarflow; git-ignored
here, never imported by tarflow itself). The script is deterministic and re-runnable: it rewrites
the same files byte for byte (given the same torch build) and leaves nothing else behind.

For every entry of MODELS it builds a TINY `transformer_flow.Model` of that shape and mode with the
published code, gives it random weights (every parameter, so the zero-initialised `proj_out` makes
a non-trivial flow; VP models also get a `var` buffer away from 1, as training leaves it), and
writes:

* `<file name>.xz`: `torch.save(model.state_dict())` exactly as the reference trainer writes it
  (file name `{dataset}_model_{patch}_{width}_{blocks}_{layers}_{noise}.pth`, or a name with no
  recognisable pattern, or `.pt`), xz-compressed to keep the repository small. The weights are
  multiples of powers of two with few distinct values, which is what makes them compress (the
  function is as general as with any other values). Tests decompress it under its own name.
* `<file name>.expected.pt`: a dict of tensors (load with `weights_only=True`) with what the
  reference computes, once in float32 (`f32/...`, the model as saved) and once in float64
  (`f64/...`, the same weights cast to double; the reference's `.float()` casts for LayerNorm and
  exp are made no-ops for float64 tensors while it runs, so it stays float64 throughout):
  - `x` (B, C, S, S) inputs in [-1, 1] scale; `y`, `y_dropped` labels (conditional models;
    `y_dropped` has -1 in some rows);
  - `z`, `logdets` forward outputs (labels `y`), `z_dropped`, `logdets_dropped`, `z_nolabel`,
    `logdets_nolabel` (no labels: the mean class embedding). `logdets` is the reference's value:
    the per-dimension mean of -a summed over blocks (total / (T*D));
  - `log_prob`: log N(z; 0, var) summed + logdets * T * D, nats per image;
  - `noise` (B, T, D) and one `sample/<mode>` per entry of the model's sampling modes
    (`Model.reverse(noise, y, guidance, guide_what, attn_temp, annealed_guidance)`; modes marked
    `no_labels` pass y=None: the mean class embedding in both passes of a conditional model);
  - `denoised`: x + sigma^2 * grad_x log p(x) for x = `sample/g0` with sigma = the model's noise
    std (or 0.1), the gradient by autograd through the reference forward with the prior N(0, var).
* `manifest.json`: per fixture its file name, the architecture the loader must infer
  (tarflow `ModelConfig` fields), the noise the name gives, the sampling modes' options in
  `TarFlow.sample` terms, the denoising sigma and the labels used.

tests/core/test_reference_shapes.py checks tarflow against these files without needing `ref/`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import lzma
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "reference"
BATCH = 3
HEAD_DIM = 64  # the published code's (fixed) head size

# name, architecture (published `Model` arguments), labels, sampling modes, noise std for denoising
MODELS = [
    dict(  # unconditional NVP, uniform dequantization (likelihood run), guidance through attn_temp
        file="cifar10_model_2_64_2_1_uniform.pth",
        arch=dict(
            in_channels=3,
            img_size=8,
            patch_size=2,
            channels=64,
            num_blocks=2,
            layers_per_block=1,
            nvp=True,
            num_classes=0,
        ),
        modes={
            "g0": {},
            "g15_temp05": dict(guidance=1.5, attn_temp=0.5),
            "g1_b_temp13_annealed": dict(guidance=1.0, guide_what="b", attn_temp=1.3, annealed=True),
            "g2_a_temp07": dict(guidance=2.0, guide_what="a", attn_temp=0.7),
        },
        sigma=None,
    ),
    dict(  # VP (shift only, learned var), 1 channel, 9 tokens, 3 blocks (odd), 10 classes
        file="mnist_model_4_64_3_1_0.10.pth",
        arch=dict(
            in_channels=1,
            img_size=12,
            patch_size=4,
            channels=64,
            num_blocks=3,
            layers_per_block=1,
            nvp=False,
            num_classes=10,
        ),
        labels=[0, 9, 3],
        modes={
            "g0": {},
            "g0_nolabel": dict(no_labels=True),
            "g2_ab": dict(guidance=2.0),
            "g15_a": dict(guidance=1.5, guide_what="a"),
            "g1_b_annealed": dict(guidance=1.0, guide_what="b", annealed=True),
            "g15_temp05": dict(guidance=1.5, attn_temp=0.5),
            "g15_temp05_annealed": dict(guidance=1.5, attn_temp=0.5, annealed=True),
        },
        sigma=0.10,
    ),
    dict(  # no recognisable name, .pt; patch 1 (D = 3), 1000 classes, one block of 2 layers
        file="my_flow.pt",
        arch=dict(
            in_channels=3,
            img_size=4,
            patch_size=1,
            channels=64,
            num_blocks=1,
            layers_per_block=2,
            nvp=True,
            num_classes=1000,
        ),
        labels=[0, 999, 500],
        modes={
            "g0": {},
            "g2_ab": dict(guidance=2.0),
            "g1_b_annealed": dict(guidance=1.0, guide_what="b", annealed=True),
            "g15_temp05": dict(guidance=1.5, attn_temp=0.5),
            "g15_temp05_nolabel": dict(guidance=1.5, attn_temp=0.5, no_labels=True),
        },
        sigma=None,
    ),
    dict(  # patch 8, 1 channel (D = 64), 2 heads (width 128), 4 tokens, one block
        file="afhq_model_8_128_1_1_0.07.pth",
        arch=dict(
            in_channels=1,
            img_size=16,
            patch_size=8,
            channels=128,
            num_blocks=1,
            layers_per_block=1,
            nvp=True,
            num_classes=3,
        ),
        labels=[2, 0, 1],
        modes={
            "g0": {},
            "g15_a_annealed": dict(guidance=1.5, guide_what="a", annealed=True),
            "g15_temp05": dict(guidance=1.5, attn_temp=0.5),
        },
        sigma=0.07,
    ),
    dict(  # VP unconditional, D = 48 (3 x 4 x 4, also 12 x 2 x 2 and 48 x 1 x 1), learned var
        file="imagenet_model_4_64_2_1_0.15.pth",
        arch=dict(
            in_channels=3,
            img_size=8,
            patch_size=4,
            channels=64,
            num_blocks=2,
            layers_per_block=1,
            nvp=False,
            num_classes=0,
        ),
        modes={
            "g0": {},
            "g15_temp05": dict(guidance=1.5, attn_temp=0.5),
            "g1_temp13_annealed": dict(guidance=1.0, attn_temp=1.3, annealed=True),
        },
        sigma=0.15,
    ),
    dict(  # 1 channel, patch 2 (D = 4), no pattern in the name, 2 layers per block
        file="gray.pth",
        arch=dict(
            in_channels=1,
            img_size=8,
            patch_size=2,
            channels=64,
            num_blocks=2,
            layers_per_block=2,
            nvp=True,
            num_classes=0,
        ),
        modes={"g0": {}, "g15_temp05": dict(guidance=1.5, attn_temp=0.5)},
        sigma=None,
    ),
]


def load_reference(ref_dir: Path):
    path = ref_dir / "transformer_flow.py"
    if not path.is_file():
        sys.exit(
            f"{path} not found: recreate it with\n  mkdir -p ref && git -C /work/.mirror/apple+ml-tarflow/repo "
            "show HEAD:transformer_flow.py > ref/transformer_flow.py"
        )
    spec = importlib.util.spec_from_file_location("reference_transformer_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantized(shape, scale: float, g: torch.Generator, levels: int = 4) -> torch.Tensor:
    """Random multiples of scale / levels in [-scale, scale]: few distinct values, exact in float32."""
    return torch.randint(-levels, levels + 1, shape, generator=g).to(torch.float32) * (scale / levels)


def pow2(v: float) -> float:
    return 2.0 ** round(math.log2(v))


def randomise(model: torch.nn.Module, nvp: bool, g: torch.Generator) -> None:
    """Every parameter random (quantized), sized so that a flow of a few blocks stays tame."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + quantized(p.shape, 0.25, g))
            elif name.endswith("norm.bias") or name.endswith(".bias"):
                p.copy_(quantized(p.shape, 0.125, g))
            elif name.endswith("pos_embed") or name.endswith("class_embed"):
                p.copy_(quantized(p.shape, 1.0, g))
            elif name.endswith("proj_out.weight"):
                p.copy_(quantized(p.shape, pow2(0.15 / math.sqrt(p.shape[1])), g))
            elif p.dim() == 2:
                p.copy_(quantized(p.shape, pow2(1.0 / math.sqrt(p.shape[1])), g, levels=1))
            else:
                raise AssertionError(f"unexpected parameter {name}")
        if not nvp:
            model.var.copy_(0.5 + quantized(model.var.shape, 1.0, g, levels=8).abs())


@contextlib.contextmanager
def float64_throughout():
    """While the reference runs in float64: its `.float()` casts (LayerNorm input, exp) keep float64."""
    original = torch.Tensor.float

    def keep_double(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_double
    try:
        yield
    finally:
        torch.Tensor.float = original


def log_prob(model, x, y):
    z, _, logdets = model(x, y)
    T, D = z.shape[1:]
    var = model.var.to(z.dtype)
    prior = (-0.5 * (z * z / var + torch.log(var) + math.log(2 * math.pi))).flatten(1).sum(1)
    return prior + logdets * (T * D), z, logdets


def outputs(model, spec: dict, x: torch.Tensor, y, y_dropped, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        lp, z, logdets = log_prob(model, x, y)
        out.update(z=z, logdets=logdets, log_prob=lp)
        if y is not None:
            _, z, logdets = log_prob(model, x, y_dropped)
            out.update(z_dropped=z, logdets_dropped=logdets)
            _, z, logdets = log_prob(model, x, None)
            out.update(z_nolabel=z, logdets_nolabel=logdets)
        for mode, opts in spec["modes"].items():
            out[f"sample/{mode}"] = model.reverse(
                noise.clone(),
                None if opts.get("no_labels") else y,
                guidance=opts.get("guidance", 0.0),
                guide_what=opts.get("guide_what", "ab"),
                attn_temp=opts.get("attn_temp", 1.0),
                annealed_guidance=opts.get("annealed", False),
            )
    xs = out["sample/g0"].clone().requires_grad_(True)
    sigma = spec["sigma"] or 0.1
    (grad,) = torch.autograd.grad(log_prob(model, xs, y)[0].sum(), xs)
    out["denoised"] = (xs + sigma**2 * grad).detach()
    return {k: v.detach().clone() for k, v in out.items()}


def tarflow_config(arch: dict) -> dict:
    return dict(
        in_channels=arch["in_channels"],
        img_size=arch["img_size"],
        patch_size=arch["patch_size"],
        width=arch["channels"],
        num_blocks=arch["num_blocks"],
        layers_per_block=arch["layers_per_block"],
        head_dim=HEAD_DIM,
        expansion=4,
        nvp=arch["nvp"],
        num_classes=arch["num_classes"],
    )


def name_noise(file: str) -> dict:
    stem = file.rsplit(".", 1)[0]
    last = stem.rsplit("_", 1)[-1]
    if "_model_" not in stem:
        return {"type": None, "std": None}
    if last == "uniform":
        return {"type": "uniform", "std": None}
    return {"type": "gaussian", "std": float(last)}


def make(tf, spec: dict, out_dir: Path, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    arch = spec["arch"]
    torch.manual_seed(seed)  # the constructor's own random initialisation (overwritten below)
    model = tf.Model(**arch).eval()
    randomise(model, arch["nvp"], g)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write(out_dir / f"{spec['file']}.xz", lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))

    C, S, p, K = arch["in_channels"], arch["img_size"], arch["patch_size"], arch["num_classes"]
    T, D = (S // p) ** 2, C * p * p
    x = (torch.rand(BATCH, C, S, S, generator=g) * 2 - 1).to(torch.float32)
    noise = torch.randn(BATCH, T, D, generator=g)
    y = torch.tensor(spec["labels"]) if K else None
    y_dropped = torch.tensor([-1, spec["labels"][1], -1]) if K else None
    expected: dict[str, torch.Tensor] = {"x": x, "noise": noise}
    if K:
        expected.update(y=y, y_dropped=y_dropped)
    for tag, dtype in (("f32", torch.float32), ("f64", torch.float64)):
        m = model.to(dtype)
        with float64_throughout() if dtype == torch.float64 else contextlib.nullcontext():
            res = outputs(m, spec, x.to(dtype), y, y_dropped, noise.to(dtype))
        for k, v in res.items():
            if not torch.isfinite(v).all():
                raise AssertionError(f"{spec['file']}: non-finite reference output {k}; choose tamer weights")
            expected[f"{tag}/{k}"] = v
    model.float()
    buf = io.BytesIO()
    torch.save(expected, buf)
    write(out_dir / f"{spec['file']}.expected.pt", buf.getvalue())
    return dict(
        file=spec["file"],
        config=tarflow_config(arch),
        noise=name_noise(spec["file"]),
        modes=spec["modes"],
        sigma=spec["sigma"] or 0.1,
        labels=spec.get("labels"),
        parameters=sum(p.numel() for p in model.parameters()),
    )


def write(path: Path, data: bytes) -> None:
    """Atomic write: a temporary file beside the target, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ref", type=Path, default=ROOT / "ref", help="folder holding the published transformer_flow.py"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the fixtures go")
    parser.add_argument("--seed", type=int, default=20250101)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tf = load_reference(args.ref)
    tf.Attention.USE_SPDA = True  # the published default
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = [make(tf, spec, args.out, args.seed + i) for i, spec in enumerate(MODELS)]
    write(args.out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {len(manifest)} fixtures to {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
