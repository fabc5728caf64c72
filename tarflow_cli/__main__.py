"""`python -m tarflow_cli ...` (also the `torchrun ... -m tarflow_cli train ...` entry)."""

from .entry import main

main()
