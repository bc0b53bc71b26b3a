"""``python -m vps.bench --memory-probe SPEC``: the subprocess `vps.bench.memory.run_probe` starts (use ``vps bench``).

The entry point lives in `vps.bench.memory`; this hook keeps the command line the probe runs (and that
BENCHMARKS.md cites) the same as when ``vps.bench`` was a single module.
"""

import sys

from .memory import main

if __name__ == "__main__":
    sys.exit(main())
