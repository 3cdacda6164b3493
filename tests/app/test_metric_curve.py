"""fish-report's metric_vs_params curve on a small synthetic ``fish.sparsity`` x ``fish.selection`` multirun with
vanilla ranks and a head-only run: one line per selection, the ranks as their own line, the spread over seeds, log
x, methods that share a budget told apart, a legend that names exactly the lines drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fish_lightning.app.report import collect_runs, summarize, write_report
from fish_lightning.app.report_plots import curve_figure, curve_lines

CANDIDATES, HEAD = 73_728, 770
SPARSITIES = (0.75, 0.9375, 0.99)
SCORE = {"fisher": 0.80, "random": 0.78, "reverse": 0.60}


def write_run(root: Path, i: int, method: str, overrides: list[str], seed: int, params: int, acc: float) -> None:
    run = root / str(i)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [*overrides, f"seed={seed}"]))
    (run / "results.json").write_text(json.dumps({
        "status": "ok", "task": "sst2", "method": method, "seed": seed, "trainable_params": params,
        "metrics": {"val/accuracy": acc}, "primary_metric": "val/accuracy", "wall_time_s": 1.0,
        "overrides": [*overrides, f"seed={seed}"]}))  # fmt: skip


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    """3 selections x 3 sparsities, vanilla LoRA r=1/2/8 and head-only, 3 seeds each (seed s adds 0.01 * s)."""
    root, i = tmp_path / "multirun", 0
    for seed in range(3):
        for sel, base in SCORE.items():
            for s in SPARSITIES:
                kept = round((1 - s) * CANDIDATES)
                write_run(root, i, f"lora-r8+{sel}", ["peft=lora", "peft.r=8", f"fish={sel}", f"fish.sparsity={s}"],
                          seed, kept + HEAD, base - s / 10 + 0.01 * seed)  # fmt: skip
                i += 1
        for r in (1, 2, 8):
            write_run(root, i, f"lora-r{r}", ["peft=lora", f"peft.r={r}", "fish=off"], seed, r * 9216 + HEAD,
                      0.7 + 0.01 * r + 0.01 * seed)  # fmt: skip
            i += 1
        write_run(root, i, "head-only", ["peft=none", "fish=off"], seed, HEAD, 0.55 + 0.01 * seed)
        i += 1
    return root


def test_curve_lines_of_a_sparsity_by_selection_sweep(multirun):
    lines = curve_lines(summarize(collect_runs(multirun)))
    assert list(lines) == ["sst2"]
    by_label = {line["label"]: line for line in lines["sst2"]}
    assert set(by_label) == {"lora-r8+fisher", "lora-r8+random", "lora-r8+reverse", "lora (vanilla ranks)", "head-only"}
    vanilla = by_label["lora (vanilla ranks)"]
    assert vanilla["kind"] == "ranks" and [p["rank"] for p in vanilla["points"]] == [1, 2, 8]
    assert by_label["head-only"]["kind"] == "reference" and len(by_label["head-only"]["points"]) == 1
    for sel, base in SCORE.items():
        points = by_label[f"lora-r8+{sel}"]["points"]
        assert [p["x"] for p in points] == [round((1 - s) * CANDIDATES) + HEAD for s in reversed(SPARSITIES)]
        for p, s in zip(points, reversed(SPARSITIES)):
            assert p["n"] == 3 and p["mean"] == pytest.approx(base - s / 10 + 0.01)
            assert p["std"] == pytest.approx(0.01)  # the sample std of +0, +0.01, +0.02


def test_lines_that_share_a_name_are_told_apart(multirun):
    rows = summarize(collect_runs(multirun))
    extra = [{**r, "group": r["group"] + " fish.warmup_steps=0", "mean": r["mean"] - 0.1}
             for r in rows if r["method"] == "lora-r8+fisher"]  # fmt: skip
    labels = [line["label"] for line in curve_lines(rows + extra)["sst2"]]
    assert "lora-r8+fisher · fish.warmup_steps=0" in labels and "lora-r8+fisher · default" in labels


def test_figure_draws_the_lines_its_legend_names(multirun):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(collect_runs(multirun))
    lines = curve_lines(rows)
    fig = curve_figure(rows, lines)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert ax.get_xscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{line['label']} (3 seeds)" for line in lines["sst2"]]
    assert len(ax.containers) == len(lines["sst2"])  # one errorbar container (line + bars) per legend entry
    fisher = next(c for c, line in zip(ax.containers, lines["sst2"]) if line["label"] == "lora-r8+fisher")
    random = next(c for c, line in zip(ax.containers, lines["sst2"]) if line["label"] == "lora-r8+random")
    fx, rx = fisher.lines[0].get_xdata(), random.lines[0].get_xdata()
    assert all(a != b for a, b in zip(fx, rx))  # same budgets, drawn side by side, not on top of each other
    assert all(abs(a / b - 1) < 0.2 for a, b in zip(fx, rx))  # ... by a few percent only
    assert [t.get_text() for t in ax.texts] == ["r=1", "r=2", "r=8"]
    plt.close(fig)


def test_fish_report_writes_the_curve(multirun, tmp_path):
    paths = write_report(multirun, tmp_path / "report")
    assert paths["metric_vs_params.png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
