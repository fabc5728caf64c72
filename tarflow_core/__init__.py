"""TarFlow library: model, likelihood, sampling, checkpoints. Never imports the CLI."""
