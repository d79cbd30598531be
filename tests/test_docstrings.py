"""The Examples sections of the public docstrings run and print what they show."""

import doctest
import importlib

import pytest

# nanoseg.datasets, nanoseg.measure and nanoseg.plotting run their own in their test files.
MODULES = ["nanoseg.mixture", "nanoseg.labeler", "nanoseg.metrics", "nanoseg.baselines"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
