"""fish-train as a user runs it: the smoke run, a sweep and its report, bad input in one line, what a run keeps,
resume after SIGKILL, requeue, and the mask a run saved."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_config_composition import composed  # noqa: E402

from fish_lightning import FisherMaskCallback


def _cli(args, tmp_path, entry="fish-train", **env_extra):
    if "PYTHONPATH" in env_extra and os.environ.get("PYTHONPATH"):  # keep the caller's path (e.g. a source tree)
        env_extra["PYTHONPATH"] = os.pathsep.join([env_extra["PYTHONPATH"], os.environ["PYTHONPATH"]])
    env = dict(os.environ, FISH_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               **env_extra)  # fmt: skip
    exe = Path(sys.executable).parent / entry
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", f"fish_lightning.{entry.split('-')[1]}"]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_smoke_experiment_through_fish_train(tmp_path):
    proc = _cli(["experiment=tiny", "export=true", "fish.rewind_frozen=true", f"hydra.run.dir={tmp_path}/run"],
                tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "adapter.fish.safetensors").is_file()
    assert res["export"]["dense_fallback"] == [] and res["export"]["ratio"] < 0.9
    assert res["status"] == "ok" and 0.0 <= res["metrics"]["val/accuracy"] <= 1.0
    assert (
        res["kept"] == round(0.5 * res["candidates"]) and res["trainable_params"] == res["kept"] + res["always_trained"]
    )
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "mask_stats.json").is_file()
    assert "val/accuracy" in proc.stdout


def test_two_by_two_multirun_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli(["-m", "experiment=tiny", "fish=fisher,random", "fish.sparsity=0.5,0.9", "trainer.max_epochs=2",
                 "data.train_samples=96", "data.val_samples=64", f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.glob("*/results.json"))) == 4
    rep = _cli([str(sweep)], tmp_path, entry="fish-report")
    assert rep.returncode == 0, rep.stderr[-3000:]
    table = (sweep / "summary.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| lora")]
    assert len(rows) == 4, table
    png = (sweep / "metric_vs_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from fish_lightning.app.report import anatomy_panels, collect_runs

    panels = anatomy_panels(sweep, collect_runs(sweep))  # from the runs' mask_stats.json: method × sparsity
    assert [[t.splitlines()[0].split(" · ", 1)[1] for t, _ in row] for row in panels] == [
        [f"lora-r8+{m} · sparsity {s}" for s in (0.5, 0.9)] for m in ("fisher", "random")
    ]
    assert (sweep / "anatomy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _main(args, tmp_path, monkeypatch, capsys):
    from fish_lightning.app.train import main

    monkeypatch.setenv("FISH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["fish-train", "model=tiny_bert", f"hydra.run.dir={tmp_path}/run", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["fish.sparsity=1.5"], r"sparsity=1.5 is out of range"),
        (["data=sst2", "data.path=/does/not/exist"], r"data.path='/does/not/exist' does not exist"),
        (["data=sst2", "data.num_labels=3", "data.path=GLUE"], r"num_labels=3 does not match task 'sst2'"),
        (["budget.r=2", "budget.kept=10"], r"budget.r=2 and budget.kept=10 are both set"),
        (["fish=off", "budget.r=2"], r"needs a FISH mask, but fish=off"),
        (["fish.mask_epoch=5"], r"fish.mask_epoch=5 is past the run \(trainer.max_epochs=2\)"),
        (["fish.scope=layer"], r"scope='layer' is not valid"),
    ],
)
def test_bad_input_fails_fast_with_one_line(args, message, tmp_path, monkeypatch, capsys, glue_dir):
    args = [a.replace("GLUE", glue_dir) for a in args]
    code, err = _main(args, tmp_path, monkeypatch, capsys)
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("fish-train: error:")]
    assert len(line) == 1 and __import__("re").search(message, line[0]), err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "failed" and "metrics" not in res  # failed before any training


def test_bad_columns_fail_fast(tmp_path, monkeypatch, capsys):
    d = tmp_path / "g" / "SST-2"
    d.mkdir(parents=True)
    for split in ("train", "dev"):
        (d / f"{split}.tsv").write_text("text\tstars\nok\t1\n")
    code, err = _main(["data=sst2", f"data.path={tmp_path / 'g'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "missing column(s) ['sentence', 'label']" in err


def test_unknown_group_option_names_choices(tmp_path):
    proc = _cli(["peft=lorax", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode != 0
    assert "peft/lorax" in proc.stderr and "lora" in proc.stderr and "dora" in proc.stderr


def test_scripts_train_py_runs_smoke(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    env = dict(os.environ, FISH_CACHE_DIR=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), "experiment=tiny", "data.train_samples=64",
                           "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/run"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"


# ------------------------------------------------------------------ artifacts, checkpoints, resume
KEEP = ["experiment=tiny", "data.train_samples=64", "data.val_samples=32", "data.batch_size=16",
        "checkpoint.every_n_train_steps=3", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false"]  # fmt: skip
# 4 batches an epoch, 2 epochs; FISH freezes at the start of epoch 1 (global step 4); checkpoints at steps 3, 6, ...


def _keep_run(tmp_path_factory, name, *extra):
    root = tmp_path_factory.mktemp(name)
    proc = _cli([*KEEP, *extra, f"hydra.run.dir={root}/run"], root)
    return root / "run", proc


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """One uninterrupted fish-train run (tiny BERT with dropout, LoRA, FISH); its directory and the process."""
    run_dir, proc = _keep_run(tmp_path_factory, "kept")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _bit_identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_run_keeps_adapter_mask_checkpoint_and_starts_quietly(kept_run):
    run_dir, proc = kept_run
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run_dir / "adapter").iterdir()}
    assert (run_dir / "fish_mask.safetensors").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["artifacts"] == {"model": "adapter", "mask": "fish_mask.safetensors", "anatomy": "mask_anatomy.png"}
    assert res["resumed_from"] is None
    out = proc.stdout + proc.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "is deprecated", "estimate number of stepping batches"):
        assert noise not in out, out
    assert "FISH: mask frozen" in out and "val/accuracy" in out


def test_run_writes_mask_anatomy_png_and_the_aggregation_in_mask_stats(kept_run):
    run_dir, _ = kept_run
    res = json.loads((run_dir / "results.json").read_text())
    stats = json.loads((run_dir / "mask_stats.json").read_text())
    anatomy, kinds = stats["anatomy"], stats["by_kind"]
    want = [f"attention.{m}.lora_{ab}" for m in ("query", "value") for ab in "AB"]  # tiny BERT, LoRA on query/value
    assert anatomy["layers"] == [0, 1] and anatomy["kinds"] == want and list(kinds) == want
    assert sum(map(sum, anatomy["total"])) == res["candidates"] == stats["candidates"]
    assert sum(map(sum, anatomy["kept"])) == res["kept"] == sum(v["kept"] for v in kinds.values())
    for i, row in enumerate(anatomy["density"]):
        assert row == [pytest.approx(k / t) for k, t in zip(anatomy["kept"][i], anatomy["total"][i])]
    png = (run_dir / "mask_anatomy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_anatomy_figure_scales_with_the_grid():
    """Readable for a 6-layer encoder and a 32-layer decoder: one labelled row per layer, rotated kind labels."""
    from fish_lightning.app.anatomy_plot import anatomy_figure, title_of

    def grid(n_layers, kinds):
        total = [[64] * len(kinds) for _ in range(n_layers)]
        kept = [[(i * 7 + j * 3) % 65 for j in range(len(kinds))] for i in range(n_layers)]
        density = [[k / 64 for k in row] for row in kept]
        return {"layers": list(range(n_layers)), "kinds": kinds, "kept": kept, "total": total, "density": density}

    encoder = grid(6, [f"attention.{m}.lora_{ab}" for m in ("query", "value") for ab in "AB"])
    decoder = grid(32, [f"self_attn.{p}_proj.lora_{ab}" for p in "qkvo" for ab in "AB"]
                   + [f"mlp.{p}_proj.lora_{ab}" for p in ("gate", "up", "down") for ab in "AB"])  # fmt: skip
    sizes = {}
    for name, anatomy in (("encoder", encoder), ("decoder", decoder)):
        fig = anatomy_figure(anatomy)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(x) for x in anatomy["layers"]]
        assert [t.get_text() for t in ax.get_xticklabels()] == anatomy["kinds"]
        assert all(t.get_rotation() == 60 for t in ax.get_xticklabels())
        kept, total = sum(map(sum, anatomy["kept"])), sum(map(sum, anatomy["total"]))
        assert ax.get_title() == title_of(anatomy) and f"kept {kept:,} of {total:,}" in ax.get_title()
        sizes[name] = fig.get_size_inches()
        fig.canvas.draw()
        height_px = ax.get_window_extent().height / len(anatomy["layers"])
        assert height_px >= 25, (name, height_px)  # a row per layer, tall enough for its 8 pt label
    assert sizes["decoder"][1] > 2 * sizes["encoder"][1] and sizes["decoder"][0] > sizes["encoder"][0]


def test_saved_adapter_reloads_with_peft_and_reproduces_the_metric(kept_run, tmp_path):
    import lightning.pytorch as pl
    from peft import PeftModel

    from fish_lightning.app.classifier import SequenceClassifier

    run_dir, _ = kept_run
    res = json.loads((run_dir / "results.json").read_text())
    cfg = composed([*KEEP], tmp_path)
    base = instantiate(cfg.model.net)  # the same seeded random base
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    data = instantiate(cfg.data)
    module = SequenceClassifier(model, num_labels=data.num_labels, metrics=data.metrics)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    for name in ("val/accuracy", "val/f1", "val/loss"):
        assert metrics[name] == pytest.approx(res["metrics"][name], abs=1e-6), name


def test_mask_file_round_trips_to_the_callback_masks(tiny, tmp_path):
    from conftest import make_loader, make_trainer
    from fish_lightning.adapters.export import load_mask, save_mask

    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=2, mask_epoch=None)
    make_trainer([cb], max_epochs=1).fit(tiny, make_loader())
    save_mask(cb.masks, tmp_path / "m.safetensors")
    loaded = load_mask(tmp_path / "m.safetensors", model=tiny)
    assert loaded.keys() == cb.masks.keys()
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], cb.masks[n].cpu()) for n in loaded)
    with pytest.raises(ValueError, match=r"mask 'net.0.weight' has shape \[16, 8\] but the parameter has shape"):
        load_mask(tmp_path / "m.safetensors", model=type(tiny)(d_in=5))


@pytest.mark.parametrize("kill_at", [4, 7], ids=["before_freeze", "after_freeze"])
def test_sigkill_then_resume_is_bit_identical(kill_at, kept_run, tmp_path_factory):
    """Killed after the checkpoint of step 3 (mid-epoch 0, before the freeze) or 6 (mid-epoch 1, after it)."""
    ref_dir, _ = kept_run
    root = tmp_path_factory.mktemp(f"killed{kill_at}")
    run_dir = root / "run"
    kill = ["+callbacks.kill._target_=conftest.KillAfterCheckpoint",
            f"+callbacks.kill.path={run_dir}/checkpoints/last.ckpt", f"+callbacks.kill.at_step={kill_at}"]  # fmt: skip
    tests = str(Path(__file__).resolve().parents[1])  # conftest importable in the child
    proc = _cli([*KEEP, *kill, f"hydra.run.dir={run_dir}"], root, PYTHONPATH=tests)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    assert not (run_dir / "adapter").exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    proc = _cli([*KEEP, "resume=true", f"hydra.run.dir={run_dir}"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: continuing from" in proc.stdout + proc.stderr
    ref, res = (json.loads((d / "results.json").read_text()) for d in (ref_dir, run_dir))
    assert res["metrics"] == ref["metrics"] and res["resumed_from"].endswith("last.ckpt")
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]  # the resumed run's curves continue
    adapter = "adapter/adapter_model.safetensors"
    assert _bit_identical(_tensors(ref_dir / adapter), _tensors(run_dir / adapter))
    assert _bit_identical(_tensors(ref_dir / "fish_mask.safetensors"), _tensors(run_dir / "fish_mask.safetensors"))
    from fish_lightning.app.report import collect_runs, summarize

    runs = collect_runs(root)
    assert len(runs) == 1 and runs[0]["status"] == "ok" and len(summarize(runs)) == 1  # fish-report reads it


def test_multirun_resumes_job_by_job(kept_run, tmp_path_factory):
    """A 2-job sweep killed in job 1 (after its step-6 checkpoint, job 0 done): the same sweep with resume=true
    continues each job from its own checkpoints/last.ckpt; both end bit-identical to the uninterrupted run."""
    ref_dir, _ = kept_run
    root = tmp_path_factory.mktemp("sweep")
    sweep = root / "sweep"
    kill = ["+callbacks.kill._target_=conftest.KillAfterCheckpoint",
            "+callbacks.kill.path=${hydra:runtime.output_dir}/checkpoints/last.ckpt"]  # fmt: skip
    tests = str(Path(__file__).resolve().parents[1])
    proc = _cli(["-m", *KEEP, *kill, "+callbacks.kill.at_step=1000,7", f"hydra.sweep.dir={sweep}"], root,
                PYTHONPATH=tests)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (sweep / "0" / "results.json").is_file() and not (sweep / "1" / "results.json").is_file()
    proc = _cli(["-m", *KEEP, *kill, "+callbacks.kill.at_step=1000,1000", "resume=true", f"hydra.sweep.dir={sweep}"],
                root, PYTHONPATH=tests)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((ref_dir / "results.json").read_text())
    for job in ("0", "1"):
        res = json.loads((sweep / job / "results.json").read_text())
        assert res["metrics"] == ref["metrics"] and res["resumed_from"].endswith("last.ckpt"), job
        adapter = "adapter/adapter_model.safetensors"
        assert _bit_identical(_tensors(ref_dir / adapter), _tensors(sweep / job / adapter)), job


def test_resume_without_checkpoint_starts_fresh_and_says_so(tmp_path):
    from fish_lightning.app.checkpointing import resume_path

    assert resume_path(tmp_path, resume=False) is None
    assert resume_path(tmp_path, resume=True) is None  # logged: starting fresh
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_path(tmp_path, resume=True) == str(tmp_path / "checkpoints" / "last.ckpt")


def test_a_requeued_slurm_job_resumes_without_asking(tmp_path, monkeypatch):
    """SLURM sets SLURM_RESTART_COUNT >= 1 in a requeued job (preemption, or submitit's requeue at the time
    limit, hydra/launcher=slurm's max_num_timeout): fish-train then resumes from the run's last.ckpt."""
    from fish_lightning.app.checkpointing import resume_path

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_path(tmp_path, resume=False) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_path(tmp_path, resume=False) is None  # the first run of the job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resume_path(tmp_path, resume=False) == str(tmp_path / "checkpoints" / "last.ckpt")


def test_mask_path_reproduces_the_run_that_made_the_mask(kept_run, tmp_path_factory):
    """``fish.mask_path``: the same kept entries; the warmup replayed (same steps, no Fisher): the same weights."""
    ref_dir, _ = kept_run
    run_dir, proc = _keep_run(tmp_path_factory, "reuse", f"fish.mask_path={ref_dir}/fish_mask.safetensors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _bit_identical(_tensors(ref_dir / "fish_mask.safetensors"), _tensors(run_dir / "fish_mask.safetensors"))
    adapter = "adapter/adapter_model.safetensors"
    assert _bit_identical(_tensors(ref_dir / adapter), _tensors(run_dir / adapter))


def test_resumable_order_matches_a_shuffled_loader_and_skips_what_was_trained():
    from torch.utils.data import DataLoader

    from fish_lightning.app.data_order import ResumableOrder

    data = list(range(10))
    plain = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5))
    order = ResumableOrder(5)
    loader = order.loader(data, batch_size=3)
    want = [[b.tolist() for b in plain] for _ in range(2)]  # two epochs: the same order as before resumable loaders
    first = [b.tolist() for b in loader]
    it = iter(loader)
    second = [next(it).tolist()]
    order.count(), order.count()  # two batches of epoch 1 trained (Lightning fetches one ahead)
    state = order.state_dict()
    assert first == want[0] and second[0] == want[1][0] and state["skip"] == 2
    again = ResumableOrder(5)
    again.load_state_dict(state)
    assert [b.tolist() for b in again.loader(data, batch_size=3)] == want[1][2:]
