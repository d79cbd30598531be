"""Sphinx configuration for the nanoseg documentation.

Build locally (no network needed)::

    python -m pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

Set ``NANOSEG_DOCS_INTERSPHINX=1`` to link to the documentation of NumPy,
SciPy, scikit-image, scikit-learn, dask, zarr and joblib (this fetches their
inventories over the network).
"""

import importlib.util
import os

import nanoseg

# -- Project -------------------------------------------------------------------

project = "nanoseg"
author = "nanoseg developers"
copyright = "nanoseg developers"
release = nanoseg.__version__
version = release

# -- General -------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
# examples/ holds the gallery's sources; sphinx-gallery turns them into
# auto_examples/ (generated at build time, not under version control).
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "examples"]

# -- Gallery -------------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "/plot_",
    "matplotlib_animations": False,
    "download_all_examples": False,
    "show_memory": False,
    "within_subsection_order": "FileNameSortKey",
}
# Single backticks in docstrings name parameters (numpydoc style): show them
# as code rather than trying to link them.
default_role = "literal"

# Stub pages for the API reference are written to api/generated/ at build
# time (that folder is not under version control).
autosummary_generate = True
autodoc_typehints = "none"

# numpydoc renders Parameters/Returns/Attributes; the class template lists the
# methods, so numpydoc must not add a second member table.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False

# -- Cross-references to other projects ---------------------------------------

if os.environ.get("NANOSEG_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
        "skimage": ("https://scikit-image.org/docs/stable", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
        "dask": ("https://docs.dask.org/en/stable", None),
        "zarr": ("https://zarr.readthedocs.io/en/stable", None),
        "joblib": ("https://joblib.readthedocs.io/en/stable", None),
    }
else:
    intersphinx_mapping = {}

# -- HTML ----------------------------------------------------------------------

if importlib.util.find_spec("pydata_sphinx_theme") is not None:
    html_theme = "pydata_sphinx_theme"
    html_theme_options = {
        "navigation_with_keys": False,
        "show_toc_level": 2,
    }
else:
    html_theme = "alabaster"

html_title = f"nanoseg {release}"
