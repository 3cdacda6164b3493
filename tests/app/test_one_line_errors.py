"""A user's mistakes end in one line naming the value and what would be valid (exit status 2, no traceback);
``fish-train --help`` is the app's help; a model's start is quiet. All in-process, through the console entries."""

import logging
import subprocess
import sys

import pytest

from fish_lightning.app import cli, launch
from fish_lightning.app.errors import ConfigError, config_error, raised_by_fish


def _fish_train(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FISH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["fish-train", f"hydra.run.dir={tmp_path}/run", *args])
    with pytest.raises(SystemExit) as exc:
        launch.main()
    return exc.value.code, capsys.readouterr().err


def _one_error_line(code, err, entry="fish-train"):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{entry}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "args, names",
    [
        (["trainer.max_epochs=two"], r"trainer.max_epochs='two' is not valid: expected an integer"),
        (["+fish.sparsty=0.5"], r"fish.sparsty is not a FISH setting: did you mean fish.sparsity\?"),
        (["peft.method=adalora"], r"peft method 'adalora' is not supported with FISH"),
        (["peft.method=lorax"], r"peft.method='lorax' is not valid: expected one of none, lora, dora"),
    ],
)
def test_a_bad_value_is_one_line(args, names, tmp_path, monkeypatch, capsys):
    line = _one_error_line(*_fish_train(["experiment=tiny", *args], tmp_path, monkeypatch, capsys))
    assert __import__("re").search(names, line), line


def test_adalora_is_not_offered_as_valid(tmp_path, monkeypatch, capsys):
    line = _one_error_line(*_fish_train(["experiment=tiny", "peft.method=adalora"], tmp_path, monkeypatch, capsys))
    assert line.count("adalora") == 1 and "use one of none, lora, dora" in line, line


def test_a_garbage_mask_file_is_one_line(tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "mask.safetensors"
    garbage.write_bytes(b"not a mask file at all" * 10)
    line = _one_error_line(*_fish_train(["experiment=tiny", f"fish.mask_path={garbage}", "fish.warmup_steps=0",
                                         "fish.mask_epoch=null"], tmp_path, monkeypatch, capsys))  # fmt: skip
    assert "mask_path" in line and str(garbage) in line, line


@pytest.mark.parametrize("override", ["hydra/launcher=local_parallel", "hydra/launcher=slurm",
                                      "hydra/sweeper=optuna_lr_sparsity"])  # fmt: skip
def test_a_launcher_without_its_extra_names_the_pip_command(override, tmp_path, monkeypatch, capsys):
    module = launch.OVERRIDE_NEEDS[override]
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    line = _one_error_line(*_fish_train(["-m", override, "experiment=tiny"], tmp_path, monkeypatch, capsys))
    assert override in line and 'pip install "fish-lightning[sweep]"' in line, line


def test_fish_cli_without_its_extra_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--print_config"])
    line = _one_error_line(exc.value.code, capsys.readouterr().err, entry="fish-cli")
    assert 'pip install "fish-lightning[cli]"' in line, line


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_model_offline_fails_at_once_with_the_hint(offline, tmp_path, monkeypatch, capsys):
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(proxy, raising=False)

        def unreachable(*args, **kwargs):
            raise OSError(101, "Network is unreachable")

        monkeypatch.setattr(socket, "create_connection", unreachable)
    line = _one_error_line(*_fish_train(["model=bert_base", "data.train_samples=8", "data.val_samples=8"],
                                        tmp_path, monkeypatch, capsys))  # fmt: skip
    assert "'google-bert/bert-base-uncased'" in line and "model=minilm" in line, line
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in line, line


def test_only_fish_refusals_become_the_one_line():
    def fish_refusal():
        raise ConfigError("fish.x=1 is not valid")

    try:
        fish_refusal()
    except ValueError as err:
        ours = err
    try:
        int("two")  # a ValueError from outside fish (here: this test module)
    except ValueError as err:
        theirs = err
    wrapped = RuntimeError("instantiating")
    wrapped.__cause__ = ours
    assert raised_by_fish(ours) and not raised_by_fish(theirs)
    assert config_error(wrapped) is ours and config_error(theirs) is None


def test_help_is_the_apps_and_imports_no_torch():
    code = ("import sys; sys.argv = ['fish-train', '--help']; from fish_lightning.app.launch import main; main(); "
            "assert 'torch' not in sys.modules and 'hydra' not in sys.modules")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("fish-train: fine-tune a model") and "powered by Hydra" not in out
    for part in ("experiment=NAME", "smoke", "tiny", "budget_matched", "--config-dir", "tiny_llama", "tinyllama",
                 "lora_decoder", "fish-report DIR"):  # fmt: skip
        assert part in out, part


@pytest.fixture
def quiet_restored():
    """quiet_start changes process-wide settings: restore them for the tests that follow."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    from fish_lightning.app import quiet

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    yield
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()
    if hub_bars:
        enable_progress_bars()
    for name in quiet._RANK_ZERO_LOGGERS:
        logging.getLogger(name).removeFilter(quiet.OWN_INFO_ONLY)
    quiet._done = False


def test_the_default_model_starts_without_load_report_or_escapes(quiet_restored, capfd):
    from fish_lightning.adapters.models import build_sequence_classifier
    from fish_lightning.app.quiet import quiet_start

    quiet_start()
    build_sequence_classifier("minilm", num_labels=3)  # a new head: transformers would report its missing keys
    out = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in out and "Loading weights" not in out and "\x1b[" not in out, out
