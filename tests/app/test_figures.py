"""Figures a reader can read: a run's anatomy title names what it shows, a sweep's anatomy panels form a grid with
whole titles, the study's bar charts start at 0 with the legend off the data."""

import json
import sys
from pathlib import Path

import pytest
import torch

from fish_lightning.app.anatomy_plot import anatomy_panels_figure
from fish_lightning.app.report_plots import anatomy_panels

ROOT = Path(__file__).resolve().parents[2]


def _grid(kept):
    kinds = ["attention.query.lora_A", "attention.value.lora_B"]
    total = [[100, 100] for _ in kept]
    return {"layers": list(range(len(kept))), "kinds": kinds, "kept": kept, "total": total,
            "density": [[k / 100 for k in row] for row in kept]}  # fmt: skip


def _runs(root, specs):
    """Run folders with a ``mask_stats.json``; ``specs``: (task, method, group, sparsity, seed)."""
    runs = []
    for i, (task, method, group, sparsity, seed) in enumerate(specs):
        (root / str(i)).mkdir()
        (root / str(i) / "mask_stats.json").write_text(json.dumps({"anatomy": _grid([[10 + i, 50], [0, 90]])}))
        runs.append({"status": "ok", "run_dir": str(i), "task": task, "method": method, "group": group,
                     "sparsity": sparsity, "seed": seed})  # fmt: skip
    return runs


def test_one_sparsity_per_method_makes_a_task_by_method_grid_with_whole_titles(tmp_path):
    methods = {"lora-r8+fisher": "fish=fisher", "lora-r8+random": "fish=random", "lora-r8+reverse": "fish=reverse"}
    specs = [(task, m, f"budget.r=2 data={task} {sel} optim.lr={lr}", 0.75, seed)
             for task, lr in (("sst2", 0.003), ("stsb", 0.01)) for m, sel in methods.items() for seed in (0, 1)]
    panels = anatomy_panels(tmp_path, _runs(tmp_path, specs))
    assert [len(row) for row in panels] == [3, 3]  # rows = tasks, columns = methods, not one long column
    first = panels[0][0][0].splitlines()
    # task, method (selection), sparsity, the setting that differs (not budget.r=2, common to all), kept, seeds
    assert first == ["sst2 · lora-r8+fisher · sparsity 0.75", "optim.lr=0.003",
                     "kept 301 of 800 (density 0.376), 2 seeds"]  # fmt: skip
    fig = anatomy_panels_figure(panels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(visible) == 6
    for ax in visible:
        title = ax.title.get_window_extent(renderer)
        assert page.x0 <= title.x0 and title.x1 <= page.x1 and page.y0 <= title.y0 and title.y1 <= page.y1
        for other in visible:  # a title never runs into the panel above it (tick labels included)
            if other is not ax and other.get_tightbbox(renderer).y0 > ax.get_window_extent().y1:
                assert not title.overlaps(other.get_tightbbox(renderer)), ax.get_title()


def test_a_runs_anatomy_title_names_task_method_selection_sparsity_and_kept(tiny_lora, tmp_path, monkeypatch):
    from fish_lightning.app import artifacts

    titles = []
    monkeypatch.setattr(artifacts, "write_anatomy_png", lambda anatomy, path, title=None: titles.append(title))
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5
             for n, p in tiny_lora.named_parameters() if "lora_" in n}  # fmt: skip

    class Fish:  # what save_artifacts reads of a FisherMaskCallback after the freeze
        selection, sparsity, freeze_step = "random", 0.5, 3
        num_kept = sum(int(m.sum()) for m in masks.values())
        num_candidates = sum(m.numel() for m in masks.values())

    Fish.masks = masks
    artifacts.save_artifacts(tmp_path, tiny_lora, Fish(), label="sst2 · lora-r8+random")
    assert titles == [f"sst2 · lora-r8+random · sparsity 0.5\nkept {Fish.num_kept:,} of {Fish.num_candidates:,} "
                      f"(density {Fish.num_kept / Fish.num_candidates:.3g})"]  # fmt: skip


def test_study_bars_start_at_zero_and_the_legend_is_off_the_data():
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    table = {"lora-r2": [0.80, 0.82, 0.81], "lora-r8+fisher": [0.81, 0.80, 0.82], "lora-r8+reverse": [0.79, 0.80]}
    fig = reproduce.task_bar_figure("sst2", table)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0  # ties near 0.8 look like ties
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # beside the axes, over no bar
    assert [t.get_text() for t in ax.texts] == ["0.810", "0.810", "0.795"]  # each mean written on its bar
    negative = reproduce.task_bar_figure("cola", {"a": [0.03, 0.04], "b": [-0.02, -0.03]})
    assert negative.axes[0].get_ylim()[0] < -0.03  # a negative score still shows whole


@pytest.fixture
def tiny_lora():
    from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
    from fish_lightning.adapters.tiny import tiny_config
    from fish_lightning.app.classifier import SequenceClassifier

    model = apply_peft(build_sequence_classifier(num_labels=2, tiny_config=tiny_config()), "lora", r=2,
                       target_modules=["query", "value"])  # fmt: skip
    return SequenceClassifier(model, num_labels=2)
