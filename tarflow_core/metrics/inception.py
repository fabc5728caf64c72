"""The FID Inception-v3 network in plain PyTorch, and where its weights come from.

This is the network every common FID tool uses: the TensorFlow graph
``inception-2015-12-05`` (1008 classes), read at its 2048-d final pool. Its PyTorch weights
are distributed as ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid; torch-fidelity
ships the same tensors as ``weights-inception-2015-12-05-6726825d.pth``), a state dict whose
keys follow torchvision's ``Inception3`` module names, e.g. ``Mixed_5b.branch1x1.conv.weight``
or ``Conv2d_1a_3x3.bn.running_var``. :class:`FIDInceptionV3` uses the same names, so the file
loads strictly.

Where this graph differs from torchvision's ImageNet Inception-v3 (and what we do):
- the average pools inside the A, C and first E blocks leave the zero padding out of the
  average (TensorFlow's ``SAME`` pooling): ``count_include_pad=False``;
- the last E block (``Mixed_7c``) pools its pool branch with a 3x3 *max* pool;
- 1008 output classes; no auxiliary head;
- input: 8-bit RGB values, resized to 299x299 by TensorFlow 1.x ``ResizeBilinear``
  (``align_corners=False``, no half-pixel centres), then mapped by (x - 128) / 128.
  ``resize="pytorch"`` instead reproduces pytorch-fid's preprocessing (x / 255, PyTorch
  bilinear with half-pixel centres, then 2x - 1); the two agree exactly at 299x299 input
  up to the 127.5 vs 128 offset.

Every conv has no bias and is followed by batch norm (eps 0.001, running statistics) and ReLU.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_path
from ..load_errors import describe, file_head, not_torch

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_SHA256_PREFIX = "6726825d"  # the published checksum: the sha256 prefix in the file name
OTHER_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth",)  # torch-fidelity's copy
ENV_VAR = "TARFLOW_INCEPTION"
FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # the smallest input for which the final feature map is not empty
RESIZE_MODES = ("tf", "pytorch")


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing, unreadable or not the expected network."""


# ------------------------------------------------------------------------------------- network


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU; names `conv` and `bn` as in the weight file."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 SAME average pool that averages only over real (unpadded) pixels."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (64 + 64 + 96 + pool_out channels)."""

    def __init__(self, cin: int, pool_out: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (c7 inner channels); 4 x 192 out."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; 320 + 768 + 768 + 192 = 2048 channels out.

    ``max_pool`` selects the pool branch's pooling: average (without padding) in ``Mixed_7b``,
    max in ``Mixed_7c`` -- a quirk of the 2015 graph that FID depends on.
    """

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the TF 2015-12-05 graph; ``forward`` returns the 2048-d pool features.

    Input: images (B, 3, H, W) with values in 0..255 (uint8 or float). Grayscale (B, 1, H, W)
    is repeated to three channels. Any H, W: the images are resized to ``size`` (299, the
    standard; smaller values only for fast tests) as described in the module docstring.
    """

    def __init__(self, resize: str = "tf", size: int = INPUT_SIZE):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")
        if size < MIN_INPUT_SIZE:
            raise ValueError(f"Inception input size must be at least {MIN_INPUT_SIZE} (got {size})")
        self.resize, self.size = resize, int(size)
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the logits; loaded for strictness, unused for FID
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """0..255 images (B, 1|3, H, W) -> the network's input (B, 3, size, size) in [-1, 1]."""
        w = self.fc.weight
        return preprocess(images, resize=self.resize, size=self.size, dtype=w.dtype, device=w.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input (B, 3, S, S) -> (B, 2048) final-pool features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), _exact_matmuls():
            return self.features(self.preprocess(images)).float()


def preprocess(
    images: torch.Tensor,
    *,
    resize: str = "tf",
    size: int = INPUT_SIZE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """0..255 images (B, 1|3, H, W) -> Inception input (B, 3, size, size) in [-1, 1]: grayscale
    repeated to RGB; ``tf``: TF 1.x bilinear resize then (x - 128) / 128; ``pytorch``: x / 255,
    PyTorch bilinear (half-pixel centres), then 2x - 1."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.to(device=device if device is not None else images.device, dtype=dtype)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize == "tf":
        return (resize_bilinear_tf1(x, size) - 128) / 128
    if resize != "pytorch":
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")
    x = x / 255
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return 2 * x - 1


@contextlib.contextmanager
def _exact_matmuls() -> Iterator[None]:
    """Keep TF32 off inside the network (the standard features are float32 convolutions)."""
    cudnn = torch.backends.cudnn
    old = (cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x ``ResizeBilinear(align_corners=False)`` computes it.

    Output pixel i samples the input at i * (in / out) (no half-pixel offset): the lower
    neighbour floor of that, the upper one clamped to the last row/column, and the two
    interpolated as top + (bottom - top) * frac, rows after columns. Same size: unchanged.
    """
    H, W = x.shape[-2:]
    if (H, W) == (size, size):
        return x

    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(x.device, x.dtype)

    ylo, yhi, dy = axis(H)
    xlo, xhi, dx = axis(W)
    left, right = x.index_select(-1, xlo), x.index_select(-1, xhi)
    rows = left + (right - left) * dx
    top, bottom = rows.index_select(-2, ylo), rows.index_select(-2, yhi)
    return top + (bottom - top) * dy[:, None]


# ---------------------------------------------------------------------------- weights on disk


def expected_state_shapes(model: FIDInceptionV3 | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of the standard weight file and its tensor shape."""
    if model is None:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = FIDInceptionV3()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tarflow``, else ``~/.cache/tarflow``."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "tarflow"


def default_weights_path() -> Path:
    """Where a download goes."""
    return cache_dir() / WEIGHTS_FILENAME


def candidate_paths() -> list[Path]:
    """Known places for the weight file: our cache, then torch hub's checkpoints folder
    (where pytorch-fid and torch-fidelity download it)."""
    paths = [default_weights_path()]
    try:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
    except Exception:  # pragma: no cover - torch hub misconfigured
        hub = None
    if hub is not None:
        paths += [hub / WEIGHTS_FILENAME] + [hub / name for name in OTHER_FILENAMES]
    return paths


def find_weights(
    explicit: str | os.PathLike | None = None, *, download: bool = True, log: Callable[[str], None] | None = None
) -> Path:
    """The weight file to use: ``explicit``, else ``$TARFLOW_INCEPTION``, else a known cache
    path, else a download (checksum verified) to :func:`default_weights_path`.

    Raises :class:`InceptionWeightsError` with a message saying where to put the file.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(
                f"--inception-weights {explicit}: no such file (expected {WEIGHTS_FILENAME} from {WEIGHTS_URL})"
            )
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(
                f"${ENV_VAR}={env}: no such file (expected {WEIGHTS_FILENAME} from {WEIGHTS_URL})"
            )
        return path
    for path in candidate_paths():
        if path.is_file():
            return path
    target = default_weights_path()
    if not download:
        raise InceptionWeightsError(_not_found_message(target))
    if log:
        log(f"downloading the FID Inception weights (~92 MB) from {WEIGHTS_URL} to {target}")
    try:
        download_weights(target)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise InceptionWeightsError(f"{_not_found_message(target)} (download failed: {_reason(e)})") from None
    return target


def _not_found_message(target: Path) -> str:
    return (
        f"Inception weights not found; download {WEIGHTS_URL} to {target} or pass "
        f"--inception-weights FILE (or set ${ENV_VAR})"
    )


def _reason(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or e) or type(e).__name__


def download_weights(
    target: Path, url: str = WEIGHTS_URL, sha256_prefix: str = WEIGHTS_SHA256_PREFIX, timeout: float = 60.0
) -> Path:
    """Stream ``url`` to ``target`` atomically; refuse it unless its sha256 starts with the prefix."""
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        got = digest.hexdigest()
        if not got.startswith(sha256_prefix):
            raise InceptionWeightsError(
                f"the file downloaded from {url} has sha256 {got[:16]}..., "
                f"expected a hash starting {sha256_prefix}; not using it"
            )
    return target


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file as tensors only (never unpickles code)."""
    problem = not_torch(file_head(path))
    if problem:
        raise InceptionWeightsError(f"Inception weights {path}: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(
            f"Inception weights {path}: not a readable PyTorch state dict ({describe(e)})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"Inception weights {path}: expected a state dict of tensors")
    return state


def load_weights(model: FIDInceptionV3, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load the standard weight-file layout strictly (``num_batches_tracked`` may be absent)."""
    want = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})"
        for k in want
        if k in state and tuple(state[k].shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} wrong shapes (e.g. {wrong[0]})")
        raise InceptionWeightsError(
            f"Inception weights {source}: not the FID Inception-v3 layout ({WEIGHTS_FILENAME}): {'; '.join(parts)}"
        )
    full = {k: (state[k] if k in state else torch.zeros_like(want[k])) for k in want}
    model.load_state_dict(full, strict=True)


def random_init(model: FIDInceptionV3, seed: int = 0) -> FIDInceptionV3:
    """Seeded random weights that keep activations O(1) (He-normal convs, identity batch norm,
    unit running variance). Only for plumbing checks: features of such a network say nothing
    about image quality and FID values computed with it are not comparable to anything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked.zero_()
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, (1.0 / m.in_features) ** 0.5, generator=g)
                m.bias.zero_()
    return model


def load_inception(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    resize: str = "tf",
    size: int = INPUT_SIZE,
    download: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[FIDInceptionV3, str]:
    """Build the network with weights from ``weights`` (a path; ``"random"`` or ``"random:SEED"``
    for a plumbing check) or the usual places (see :func:`find_weights`).

    Returns the model in eval mode on ``device`` and a tag naming the weights: the file's sha256
    prefix, or ``random-SEED``.
    """
    with torch.device("meta"):  # every tensor is overwritten below: skip the default initialisation
        model = FIDInceptionV3(resize=resize, size=size)
    model = model.to_empty(device="cpu")
    if weights is not None and (str(weights) == "random" or str(weights).startswith("random:")):  # not random.pth
        _, _, seed = str(weights).partition(":")
        try:
            seed_value = int(seed or 0)
        except ValueError:
            raise InceptionWeightsError(
                f"--inception-weights {weights}: expected a file, random or random:SEED"
            ) from None
        random_init(model, seed_value)
        tag = source = f"random-{seed_value}"
    else:
        path = find_weights(weights, download=download, log=log)
        load_weights(model, load_state(path), str(path))
        tag, source = file_sha256(path)[:8], str(path)
    model.weights_source = source  # the file the weights came from, or random-SEED
    return model.to(device).eval(), tag
