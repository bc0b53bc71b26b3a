"""The test suite, laid out like ``src/vps/`` (README, "What VPS does").

``tests`` and each of its folders are packages, so that test modules of the same name in two folders
(``core/test_config.py`` for ``vps.config``, ``refinement/test_config.py`` for ``vps.refinement.config``)
collect side by side under pytest's default import mode, and the shared helpers are imported by their
full name from the repository root (``from tests.helpers.tiny import tiny_llama``).
"""
