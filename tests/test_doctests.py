"""The Examples sections of the docstrings run and print what they show.

This is the one place where docstring examples are run: each module listed in
``MODULES`` gets one test. The plotting examples are skipped when matplotlib
(an optional dependency) is not installed.
"""

import doctest
import importlib
import pkgutil

import pytest

import nanoseg

DEFAULT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Module -> doctest option flags its examples are run with.
MODULES = {
    "nanoseg._intensity": DEFAULT_FLAGS,
    "nanoseg._spacing": DEFAULT_FLAGS,
    "nanoseg.baselines": DEFAULT_FLAGS,
    "nanoseg.classifier": DEFAULT_FLAGS,
    # Without NORMALIZE_WHITESPACE: the datasets examples must match their whitespace too.
    "nanoseg.datasets": doctest.ELLIPSIS,
    "nanoseg.io": DEFAULT_FLAGS,
    "nanoseg.labeler": DEFAULT_FLAGS,
    "nanoseg.measure": DEFAULT_FLAGS,
    "nanoseg.metrics": DEFAULT_FLAGS,
    "nanoseg.mixture": DEFAULT_FLAGS,
    "nanoseg.persistence": DEFAULT_FLAGS,
    "nanoseg.plotting": DEFAULT_FLAGS,
    "nanoseg.preprocessing": DEFAULT_FLAGS,
    "nanoseg.splitting": DEFAULT_FLAGS,
    "nanoseg.tuning": DEFAULT_FLAGS,
}


@pytest.fixture
def headless_matplotlib():
    """Draw with the Agg backend and close every figure afterwards."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_docstring_examples(name, request):
    if name == "nanoseg.plotting":
        request.getfixturevalue("headless_matplotlib")  # skips without matplotlib
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=MODULES[name])
    assert result.attempted > 0
    assert result.failed == 0


def test_every_module_with_examples_is_listed():
    # A module whose docstrings gain examples must be added to MODULES, or they never run.
    finder = doctest.DocTestFinder()
    with_examples = set()
    for info in pkgutil.walk_packages(nanoseg.__path__, prefix="nanoseg."):
        module = importlib.import_module(info.name)
        if any(test.examples for test in finder.find(module)):
            with_examples.add(info.name)
    assert with_examples <= set(MODULES), sorted(with_examples - set(MODULES))
