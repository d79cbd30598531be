"""Command line entry point: ``nanoseg`` / ``python -m nanoseg`` (see :mod:`nanoseg.cli`)."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
