"""The documentation builds with warnings treated as errors."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("numpydoc")
pytest.importorskip("sphinx_gallery")

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
            "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "api.html").is_file()
    # The gallery's examples ran and drew their figures.
    gallery = tmp_path / "html" / "auto_examples"
    assert len(list(gallery.glob("plot_*.html"))) == len(list((DOCS / "examples").glob("plot_*.py"))) > 0
    assert list((tmp_path / "html" / "_images").glob("sphx_glr_plot_*"))
