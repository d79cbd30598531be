"""Reports of a shared-work search: its cv_results_, and summaries of what went wrong."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata

from ._tuning_steps import PerVolume, fit_hint


def results_table(candidates, scores, fit_times, score_times):
    """cv_results_ in GridSearchCV's layout."""
    results = {}
    for name, array in (("fit_time", fit_times), ("score_time", score_times)):
        results[f"mean_{name}"] = array.mean(axis=1)
        results[f"std_{name}"] = array.std(axis=1)
    keys = sorted({key for params in candidates for key in params})
    for key in keys:
        column = np.ma.MaskedArray(np.empty(len(candidates), dtype=object), mask=True)
        for i, params in enumerate(candidates):
            if key in params:
                column[i] = params[key]
        results[f"param_{key}"] = column
    results["params"] = candidates
    for split in range(scores.shape[1]):
        results[f"split{split}_test_score"] = scores[:, split]
    means = scores.mean(axis=1)
    results["mean_test_score"] = means
    results["std_test_score"] = scores.std(axis=1)
    if np.isnan(means).all():
        ranks = np.ones(len(means), dtype=np.int32)
    else:
        # Failed candidates rank together, after all others (as in GridSearchCV).
        ranks = rankdata(-np.nan_to_num(means, nan=np.nanmin(means) - 1), method="min").astype(np.int32)
    results["rank_test_score"] = ranks
    return results


def _crops(indices):
    indices = sorted(set(indices))
    return ", ".join(str(i) for i in indices)


def failure_summary(failures, n_failed, n_fits, is_list):
    """One paragraph: how many fits failed, which step on which crops, and what to change."""
    lines = [
        f"{n_failed} of {n_fits} fits (candidate and fold) failed and score nan, so those settings are "
        "not chosen."
    ]
    kinds = {}
    for crop, name, step, setting, error_type, message, hint in failures:
        kind = kinds.setdefault(
            (name, step, error_type, message.split(":")[0][:60]),
            {"crops": set(), "settings": set(), "example": f"{error_type}: {message}", "hint": hint},
        )
        kind["settings"].add(setting)
        if crop is not None:
            kind["crops"].add(crop)
    for (name, step, _, _), kind in kinds.items():
        if name == "scoring":
            lines.append(f"Scoring failed: {kind['example']}")
            continue
        if kind["crops"] and is_list:
            crops = sorted(kind["crops"])
            where = f"crop{'s' if len(crops) > 1 else ''} {', '.join(map(str, crops))} (indices into X)"
        else:
            where = "the slices of a fold" if kind["crops"] else "the training crops of a fold"
        n_settings = len(kind["settings"])
        lines.append(
            f"Step {name!r} ({step}) failed on {where} with {n_settings} of its setting"
            f"{'s' if n_settings > 1 else ''}: {kind['example']}"
        )
        if kind["hint"]:
            lines.append(kind["hint"])
    return " ".join(line if line.rstrip().endswith(".") else line.rstrip() + "." for line in lines)


def warn_collected(caught, stacklevel):
    """Show each kind of warning raised while searching once, with the crops it came from."""
    kinds = {}
    for category, message, crop in caught:
        key = (category, message.split(":")[0][:60])
        entry = kinds.setdefault(key, {"count": 0, "crops": set(), "message": message})
        entry["count"] += 1
        if crop is not None:
            entry["crops"].add(crop)
    for (category, _), entry in kinds.items():
        where = f", on crops {_crops(entry['crops'])} (indices into X)" if entry["crops"] else ""
        warnings.warn(
            f"Raised {entry['count']} time(s) while searching{where}: {entry['message']}", category,
            stacklevel=stacklevel,
        )


def failure(crop, name, step, error):
    """A picklable record of a failure: the crop, the step and its setting, the error."""
    # PerVolume names the image it was given (here always "X"): report the
    # error it wraps, and the crop by its index into X.
    from ._search import _setting_key

    cause = error.__cause__ if isinstance(step, PerVolume) and error.__cause__ is not None else error
    return (crop, name, _describe(step), _setting_key(step) if name != "scoring" else "", type(cause).__name__,
            str(cause), fit_hint(cause))


def _describe(step):
    if step is None or (isinstance(step, str) and step == "passthrough"):
        return "passthrough"
    inner = getattr(step, "estimator", None)
    if isinstance(step, PerVolume) and inner is not None:
        return f"PerVolume({type(inner).__name__})"
    return type(step).__name__
