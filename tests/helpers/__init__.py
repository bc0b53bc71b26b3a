"""Tiny models and evaluation fixtures built in code, shared by the test folders."""
