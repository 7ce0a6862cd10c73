"""Command modules for `medim` (see medim/cli.py)."""
