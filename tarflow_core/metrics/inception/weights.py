"""Where the FID Inception weights come from: finding, downloading, checking and loading them.

The PyTorch weights of the TF ``inception-2015-12-05`` graph are distributed as
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid; torch-fidelity ships the same tensors as
``weights-inception-2015-12-05-6726825d.pth``): a state dict whose keys follow torchvision's
``Inception3`` module names, as :class:`~.network.FIDInceptionV3` does, so the file loads strictly.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ...atomic import atomic_path
from ...load_errors import describe, file_head, not_torch
from .network import FIDInceptionV3
from .preprocessing import INPUT_SIZE

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_SHA256_PREFIX = "6726825d"  # the published checksum: the sha256 prefix in the file name
OTHER_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth",)  # torch-fidelity's copy
ENV_VAR = "TARFLOW_INCEPTION"


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing, unreadable or not the expected network."""


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
