"""Files of the quality-control report of :func:`nanoseg.plotting.write_report`.

Guarding the report directory against overwriting, saving each figure as a
PNG without pyplot, and composing the ``index.html`` summary.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np


def prepare_directory(directory, report_files, overwrite):
    """Create `directory`, refusing one that holds any of `report_files` unless `overwrite`."""
    directory = Path(directory)
    existing = [name for name in report_files if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} already holds a report ({', '.join(existing)}); pass overwrite=True "
            "to replace it, or choose another directory."
        )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _save(draw, path):
    # A bare Figure, not pyplot: no GUI backend, and nothing left open.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    draw(figure.subplots())
    figure.savefig(path, dpi=100)


def save_figures(directory, drawings, report_files):
    """Save ``drawings[name](ax)`` as each `name`, removing the report's other PNGs.

    A report replaced with fewer figures (without a posterior, say) must not
    keep the figures of the earlier one.
    """
    for name in report_files:
        stale = directory / name
        if name.endswith(".png") and name not in drawings and stale.exists():
            stale.unlink()
    for name, draw in drawings.items():
        _save(draw, directory / name)


def summary_html(mixture, image, table, weights, images):
    """The report's ``index.html``: counts, fitted values, size quantiles and the `images`."""
    n_particles = len(table)
    rows = [
        ("Particles", f"{n_particles}"),
        ("Image shape", " x ".join(str(int(s)) for s in image.shape)),
        ("Seed intensity (low_intensity_)", f"{int(mixture.low_intensity_)}"),
        ("Never background from (high_intensity_)", f"{int(mixture.high_intensity_)}"),
        ("Background weight", f"{float(mixture.background_weight_):.6f}"),
        ("EM updates, converged", f"{getattr(mixture, 'n_iter_', '?')}, {getattr(mixture, 'converged_', '?')}"),
    ]
    flat = np.concatenate([np.atleast_1d(w) for w in weights]) if isinstance(weights, list) else weights
    rows.append(("Particle fraction per slice", f"{flat.min():.3g} to {flat.max():.3g}"))
    quantiles = (5, 25, 50, 75, 95)
    size_rows = ""
    for column in ("equivalent_diameter", "volume", "area"):
        if column in getattr(table, "columns", ()) and n_particles:
            values = np.percentile(np.asarray(table[column], dtype=np.float64), quantiles)
            cells = "".join(f"<td>{v:.4g}</td>" for v in values)
            size_rows += f"<tr><th>{html.escape(column.replace('_', ' '))}</th>{cells}</tr>\n"
    body = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    header = "".join(f"<th>{q} %</th>" for q in quantiles)
    sizes = (
        f"<h2>Particle sizes (quantiles, spacing units)</h2>\n<table>\n<tr><th></th>{header}</tr>\n{size_rows}</table>"
        if size_rows
        else "<p>No particle sizes to summarise.</p>"
    )
    figures = "\n".join(f'<figure><img src="{name}" alt="{html.escape(name)}"></figure>' for name in images)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>nanoseg report: {n_particles} particles</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
img {{ max-width: 48%; float: left; margin: 0 1% 1em 0; }}
</style>
</head>
<body>
<h1>nanoseg report</h1>
<p>{n_particles} particles found.</p>
<table>
{body}
</table>
{sizes}
{figures}
</body>
</html>
"""
