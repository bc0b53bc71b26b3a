"""Evaluation utilities: loading items, scoring and paired statistics."""
