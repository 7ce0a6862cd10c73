"""Builders of the tiny world every test runs on: upstream-format checkpoints, tokenizers, VQGANs,
layouts, pipelines and training runs, all written by the tests themselves (no download)."""
