#!/usr/bin/env bash
# Superseded by benchmarks/device_check.py (benchmarks/README.md, "The device check"); kept as a wrapper of it.
exec python3 "$(dirname "$0")/device_check.py" --out "${OUT:-.}/device_check.json" "$@"
