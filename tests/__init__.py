"""The test suite, laid out like ``src/vps/``; a package, so that test modules of the same name in two
folders (``evaluation/test_report.py``, ``tuning/...``) collect side by side and the shared helpers are
imported by their full name (``from tests.helpers.tiny import tiny_llama``)."""
