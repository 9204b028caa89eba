"""Evaluation data shipped with powerfast (see the README in this folder)."""
