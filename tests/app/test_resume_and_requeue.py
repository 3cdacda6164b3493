"""fish-train resumed: after SIGKILL (a run, a sweep job by job), requeued by SLURM, from nothing; a saved mask
reproduces its run; the resumable data order."""

import json
from pathlib import Path

import pytest
import torch
from fish_train_runs import KEEP, bit_identical, cli, keep_run, tensors


@pytest.mark.parametrize("kill_at", [4, 7], ids=["before_freeze", "after_freeze"])
def test_sigkill_then_resume_is_bit_identical(kill_at, kept_run, tmp_path_factory):
    """Killed after the checkpoint of step 3 (mid-epoch 0, before the freeze) or 6 (mid-epoch 1, after it)."""
    ref_dir, _ = kept_run
    root = tmp_path_factory.mktemp(f"killed{kill_at}")
    run_dir = root / "run"
    kill = ["+callbacks.kill._target_=conftest.KillAfterCheckpoint",
            f"+callbacks.kill.path={run_dir}/checkpoints/last.ckpt", f"+callbacks.kill.at_step={kill_at}"]  # fmt: skip
    tests = str(Path(__file__).resolve().parents[1])  # conftest importable in the child
    proc = cli([*KEEP, *kill, f"hydra.run.dir={run_dir}"], root, PYTHONPATH=tests)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    assert not (run_dir / "adapter").exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    proc = cli([*KEEP, "resume=true", f"hydra.run.dir={run_dir}"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: continuing from" in proc.stdout + proc.stderr
    ref, res = (json.loads((d / "results.json").read_text()) for d in (ref_dir, run_dir))
    assert res["metrics"] == ref["metrics"] and res["resumed_from"].endswith("last.ckpt")
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]  # the resumed run's curves continue
    adapter = "adapter/adapter_model.safetensors"
    assert bit_identical(tensors(ref_dir / adapter), tensors(run_dir / adapter))
    assert bit_identical(tensors(ref_dir / "fish_mask.safetensors"), tensors(run_dir / "fish_mask.safetensors"))
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
    proc = cli(["-m", *KEEP, *kill, "+callbacks.kill.at_step=1000,7", f"hydra.sweep.dir={sweep}"], root,
                PYTHONPATH=tests)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (sweep / "0" / "results.json").is_file() and not (sweep / "1" / "results.json").is_file()
    proc = cli(["-m", *KEEP, *kill, "+callbacks.kill.at_step=1000,1000", "resume=true", f"hydra.sweep.dir={sweep}"],
                root, PYTHONPATH=tests)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((ref_dir / "results.json").read_text())
    for job in ("0", "1"):
        res = json.loads((sweep / job / "results.json").read_text())
        assert res["metrics"] == ref["metrics"] and res["resumed_from"].endswith("last.ckpt"), job
        adapter = "adapter/adapter_model.safetensors"
        assert bit_identical(tensors(ref_dir / adapter), tensors(sweep / job / adapter)), job


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
    run_dir, proc = keep_run(tmp_path_factory, "reuse", f"fish.mask_path={ref_dir}/fish_mask.safetensors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert bit_identical(tensors(ref_dir / "fish_mask.safetensors"), tensors(run_dir / "fish_mask.safetensors"))
    adapter = "adapter/adapter_model.safetensors"
    assert bit_identical(tensors(ref_dir / adapter), tensors(run_dir / adapter))


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
