"""`python -m tarflow_cli ...` (also the `torchrun ... -m tarflow_cli train ...` entry)."""

from .main import main

main()
