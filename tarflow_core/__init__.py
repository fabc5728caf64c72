"""TarFlow library: model, likelihood, sampling, checkpoints. Never imports the CLI."""

__version__ = "0.1.0"
