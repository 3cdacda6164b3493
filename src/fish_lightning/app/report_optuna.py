"""The Optuna sweeper's ``optimization_results.yaml``: its best trial (matched to the run directories) or Pareto
front, for :mod:`fish_lightning.app.report`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fish_lightning.app.report_runs import _as_float

OPTUNA_RESULTS = "optimization_results.yaml"


def _override_dict(overrides: Sequence[str]) -> dict[str, str]:
    return {k.lstrip("+~"): v for k, _, v in (o.partition("=") for o in overrides)}


def _same_value(a: Any, b: Any) -> bool:
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=0.0)
    return str(a) == str(b)


def read_optuna_results(dir: str | os.PathLike[str], runs: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """The Optuna sweeper's ``optimization_results.yaml`` in ``dir``, or ``None`` when there is none.

    Single objective: ``{"best_value": float, "best_params": {name: value}, "run_dirs": [...]}``, ``run_dirs`` being
    the ``runs`` whose overrides hold exactly these values. Several objectives: ``{"solutions": [{"values": [...],
    "params": {...}}, ...]}``. An unreadable file gives ``{"error": message}``.
    """
    path = Path(dir) / OPTUNA_RESULTS
    if not path.is_file():
        return None
    try:
        import yaml  # PyYAML, installed with hydra-core/omegaconf

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as e:  # a missing PyYAML, bad YAML or encoding: reported, never fatal
        return {"error": f"cannot read {OPTUNA_RESULTS}: {type(e).__name__}: {e}"}
    if not isinstance(data, dict):
        return {"error": f"{OPTUNA_RESULTS} is not a mapping"}
    if isinstance(data.get("best_params"), dict):
        best = {str(k): v for k, v in data["best_params"].items()}
        matched = [
            r["run_dir"]
            for r in runs
            if all(k in (ov := _override_dict(r.get("overrides") or [])) and _same_value(ov[k], v)
                   for k, v in best.items())
        ]  # fmt: skip
        return {"best_value": _as_float(data.get("best_value")), "best_params": best, "run_dirs": matched}
    if isinstance(data.get("solutions"), list):
        return {"solutions": [s for s in data["solutions"] if isinstance(s, dict)]}
    return {"error": f"{OPTUNA_RESULTS} has neither best_params nor solutions"}
