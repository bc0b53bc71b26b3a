"""``python -m vps``: the command line as launchers start it (``torchrun ... -m vps eval``, ``accelerate launch``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
