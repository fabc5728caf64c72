"""The `tarflow` command line and terminal dashboard."""
