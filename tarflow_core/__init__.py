"""TarFlow library: model, likelihood, sampling, checkpoints. Never imports the CLI.

The Python API, importable from the package itself::

    from tarflow_core import load_model, nll, denoise
    model = load_model("runs/tiny")            # any --ckpt form
    x = model.sample(noise, y, guidance=2.0)   # TarFlow.sample / TarFlow.forward

Where things are: `model` is the flow itself, forward and reverse, as the paper writes it;
`sampling` and `likelihood` are the checked public entry points (`inputs` holds the checks);
`fast` holds the sampling backends (packed CPU step, Jacobi solvers, CUDA graphs).

Names are resolved on first use, so `import tarflow_core` stays cheap.
"""

__version__ = "0.1.0"

_API = {
    "load_model": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "TarFlow": "model",
    "ModelConfig": "config",
    "nll": "likelihood",
    "log_prob": "likelihood",
    "bpd": "likelihood",
    "denoise": "likelihood",
    "generate": "sampling",
    "sample": "sampling",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
