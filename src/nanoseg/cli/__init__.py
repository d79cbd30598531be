"""The ``nanoseg`` command line: from a TIFF stack to a particle table.

Each step reads and writes files, so a long run can be checked and resumed
step by step::

    nanoseg convert slices/ image.zarr --spacing 50 10 10
    nanoseg fit image.zarr model.npz
    nanoseg predict image.zarr model.npz posterior.zarr
    nanoseg label posterior.zarr labels.zarr
    nanoseg measure labels.zarr particles.csv --image image.zarr

or all at once with ``nanoseg segment image.zarr labels.zarr --table
particles.csv``. A single 2D image (TIFF, PNG or JPEG) goes through the same
steps in 2D, with a pixel size ``--spacing Y X``, and is measured in areas. ``nanoseg train`` learns a
:class:`~nanoseg.NanoparticleClassifier` from annotated crops instead, for
``segment --model`` and ``predict``. Results go to stdout; progress bars,
warnings and errors go to stderr. Exit status: 0 on success, 2 for a usage
error or bad input (nothing was computed), 1 when a computation failed.

The commands live in submodules: ``_parser`` (the options), ``_steps``
(convert, fit, predict, label, measure), ``_segment`` (segment, demo),
``_train`` (train) and ``_common`` (what they share).
"""

from __future__ import annotations

import sys
import warnings

from ._common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, InputError, RunError
from ._parser import build_parser

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "InputError", "RunError", "build_parser", "main"]


def _warning_printer():
    """A ``warnings.showwarning`` that prints each message once, on one line.

    A command checks the same input at several steps (e.g. a voxel size when
    it is read and when the result is written); the user needs to read each
    warning only once.
    """
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in shown:
            shown.add(text)
            print(f"nanoseg: warning: {text}", file=sys.stderr)

    return show


def _exit_code(exc):
    """Exit status for an expected error, or None to let it propagate."""
    from sklearn.utils._param_validation import InvalidParameterError

    if isinstance(exc, (InputError, InvalidParameterError)):
        return EXIT_USAGE
    if isinstance(exc, RunError):
        return EXIT_FAILURE
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE
    if isinstance(exc, (ValueError, TypeError)):
        return EXIT_USAGE
    if isinstance(exc, (RuntimeError, OSError, MemoryError, ImportError)):
        return EXIT_FAILURE
    return None


def main(argv=None):
    """Run the command line interface and return its exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    status : int
        0 on success, 2 for a usage error or bad input, 1 when a
        computation failed. Argument errors found by the parser exit with 2
        through ``SystemExit``, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _warning_printer()
        try:
            return args.run(args)
        except KeyboardInterrupt:
            print(f"nanoseg {args.command}: interrupted; outputs being written are left incomplete.", file=sys.stderr)
            return 130
        except Exception as exc:
            code = _exit_code(exc)
            if code is None:
                raise
            message = str(exc).strip() or type(exc).__name__
            print(f"nanoseg {args.command}: error: {message}", file=sys.stderr)
            return code
