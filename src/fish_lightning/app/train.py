"""``fish-train``: the Hydra application. One run trains and writes ``results.json``; ``-m`` sweeps.

Every run directory ``D`` gets ``results.json`` (status, metrics, trainable counts, wall time; read by
``fish-report``), ``config.yaml`` (the resolved config), what was trained (:mod:`fish_lightning.app.artifacts`:
``adapter/`` in peft's format, or ``model/`` for full fine-tuning) and, with FISH on, ``fish_mask.safetensors``
(:func:`fish_lightning.adapters.export.load_mask`) and ``mask_stats.json``. ``checkpoint.every_n_train_steps=N``
writes ``D/checkpoints/last.ckpt``; ``hydra.run.dir=D resume=true`` continues from it
(:mod:`fish_lightning.app.checkpointing`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from dataclasses import fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fish_lightning.adapters.models import ADALORA_REFUSED, PEFT_METHODS, build_peft_model, count_trainable
from fish_lightning.adapters.peft_methods import REGISTRY, offered
from fish_lightning.app import run_log
from fish_lightning.app.artifacts import save_artifacts
from fish_lightning.app.causal_lm import CausalLM
from fish_lightning.app.checkpointing import checkpoint_callbacks, resume_path
from fish_lightning.app.classifier import SequenceClassifier
from fish_lightning.app.errors import ConfigError, config_error, missing_extra, one_line
from fish_lightning.app.instruction_data import InstructionData
from fish_lightning.app.quiet import quiet_start
from fish_lightning.callback.fisher_mask import FisherMaskCallback
from fish_lightning.core.budget import count_candidates, match_kept, sparsity_for_kept
from fish_lightning.core.candidates import find_candidates
from fish_lightning.core.selection import SCORERS
from fish_lightning.masker.settings import FishSettings

log = logging.getLogger("fish_lightning")

__all__ = ["ConfigError", "build_fish", "build_model", "config_error", "main", "run", "train"]


def is_causal_lm(cfg: DictConfig) -> bool:
    """Whether ``cfg.model`` is a decoder (``kind: causal_lm``) rather than a sequence classifier."""
    return cfg.model.get("kind", "classifier") == "causal_lm"


def _check_causal_pairing(cfg: DictConfig, data: Any) -> None:
    """A causal LM needs instruction data and a decoder peft config; a classifier the opposite."""
    causal, model = is_causal_lm(cfg), cfg.model.get("name")
    if causal and not isinstance(data, InstructionData):
        raise ConfigError(f"model={model} is a causal LM but data={cfg.data.task} is classification data: "
                          "use data=sst2_instruct, instruct_jsonl or alpaca")  # fmt: skip
    if not causal and isinstance(data, InstructionData):
        raise ConfigError(f"data={cfg.data.task} is instruction data for causal LMs but model={model} is a "
                          "classifier: use model=tiny_gpt2, tiny_llama, gpt2 or tinyllama")  # fmt: skip
    decoder_peft = is_decoder_peft(cfg)
    if causal and not decoder_peft and cfg.peft.get("method") != "none":
        raise ConfigError(f"model={model} is a causal LM: use peft=lora_decoder (LoRA on every projection) or "
                          f"peft=none, not peft method {cfg.peft.get('method')!r} set up for classifiers")  # fmt: skip
    if not causal and decoder_peft:
        raise ConfigError(f"peft=lora_decoder is for causal LMs; model={model} is a classifier: use peft=lora")


def is_decoder_peft(cfg: DictConfig) -> bool:
    """Whether ``cfg.peft`` is set up for causal LMs: its explicit ``task_type: CAUSAL_LM`` (peft's own field)."""
    return cfg.peft.get("task_type") == "CAUSAL_LM"


def build_model(cfg: DictConfig, peft_cfg: Any = None) -> torch.nn.Module:
    """``cfg.model.net`` wrapped with ``peft_cfg`` (default ``cfg.peft``), seeded adapter init
    (:func:`fish_lightning.adapters.models.build_peft_model`)."""
    peft_cfg = cfg.peft if peft_cfg is None else peft_cfg
    return build_peft_model(lambda: instantiate(cfg.model.net), instantiate(peft_cfg), peft_cfg["method"], cfg.seed)


def fish_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The ``fish`` config as the callback's constructor arguments."""
    kwargs = OmegaConf.to_container(cfg.fish, resolve=True)
    kwargs.pop("_target_")
    return kwargs


def fish_enabled(cfg: DictConfig) -> bool:
    return cfg.get("fish") is not None and "_target_" in cfg.fish


def method_label(cfg: DictConfig) -> str:
    """E.g. ``lora-r8+fisher``, ``dora-r2``, ``full+random``."""
    method = cfg.peft.method
    label = "full" if method == "none" else f"{method}-r{cfg.peft.r}" if "r" in cfg.peft else method
    return f"{label}+{cfg.fish.selection}" if fish_enabled(cfg) else label


#: trainer options that must be integers (None allowed): a wrong type fails here, not deep inside Lightning
_TRAINER_INTS = {"max_epochs": " (-1: no limit)", "max_steps": " (-1: no limit)", "min_epochs": "",
                 "accumulate_grad_batches": " >= 1", "log_every_n_steps": " >= 1"}  # fmt: skip


def _check_types(cfg: DictConfig) -> None:
    """Names, types and methods that fail later with a traceback: one line each, naming the key."""
    for key, valid in _TRAINER_INTS.items():
        value = cfg.trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"trainer.{key}={value!r} is not valid: expected an integer{valid}")
    method = cfg.peft.get("method")
    if not is_decoder_peft(cfg) and method not in PEFT_METHODS:
        valid = ", ".join(PEFT_METHODS)
        raise ConfigError(ADALORA_REFUSED if method == "adalora" else
                          f"peft.method={method!r} is not valid: expected one of {valid}")  # fmt: skip
    if (cfg.model.get("net") or {}).get("quantization") and (problem := missing_extra("bitsandbytes")):
        raise ConfigError(problem)
    if fish_enabled(cfg):
        valid = {f.name for f in fields(FishSettings)}
        for key in cfg.fish:
            if key != "_target_" and key not in valid:
                close = get_close_matches(str(key), sorted(valid), n=1)
                hint = f"did you mean fish.{close[0]}? " if close else ""
                raise ConfigError(f"fish.{key} is not a FISH setting: {hint}valid: {', '.join(sorted(valid))}")


def _validate(cfg: DictConfig) -> None:
    _check_types(cfg)
    budget = cfg.get("budget") or {}
    r, kept = budget.get("r"), budget.get("kept")
    if r is not None and kept is not None:
        raise ConfigError(f"budget.r={r} and budget.kept={kept} are both set: set at most one")
    if (r is not None or kept is not None) and not fish_enabled(cfg):
        raise ConfigError(
            f"budget (r={r}, kept={kept}) needs a FISH mask, but fish=off: choose fish={'|'.join(SCORERS)}"
        )
    if r is not None and ("r" not in cfg.peft or isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ConfigError(
            f"budget.r={r!r} needs an integer >= 1 and a peft method with a rank option `r` "
            f"({', '.join(n for n in offered() if REGISTRY[n].ranked)}; peft={cfg.peft.get('method')!r} has none: "
            "use budget.kept)"
        )
    if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int) or kept < 1):
        raise ConfigError(f"budget.kept={kept!r} must be an integer >= 1")
    count_always_trained = budget.get("count_always_trained")
    if count_always_trained is not None and not isinstance(count_always_trained, bool):
        raise ConfigError(f"budget.count_always_trained={count_always_trained!r} must be true or false")
    if fish_enabled(cfg):
        FishSettings(**fish_kwargs(cfg))  # the callback's own checks (sparsity range, names), before any model work
        mask_path = cfg.fish.get("mask_path")
        if mask_path is not None and not Path(mask_path).is_file():
            raise ConfigError(f"fish.mask_path={mask_path!r} is not a file: give a fish_mask.safetensors of a run")
        if mask_path is not None and (r is not None or kept is not None):
            raise ConfigError(f"fish.mask_path={mask_path!r} fixes the kept entries: unset budget.r/budget.kept")
        max_epochs = cfg.trainer.get("max_epochs")
        mask_epoch = cfg.fish.get("mask_epoch")
        if mask_epoch is not None and max_epochs is not None and max_epochs >= 0 and mask_epoch >= max_epochs:
            raise ConfigError(
                f"fish.mask_epoch={mask_epoch} is past the run (trainer.max_epochs={max_epochs}): "
                "use fish.mask_epoch < trainer.max_epochs or fish.mask_epoch=null"
            )


def _budget_kept(cfg: DictConfig, fish_kwargs: dict[str, Any], model: torch.nn.Module | None = None) -> int | None:
    """Kept candidate entries the budget asks for (:func:`fish_lightning.core.budget.match_kept`), or ``None``.

    The reference is ``budget.kept`` (an absolute number of trainable entries) or the same peft
    method at rank ``budget.r``. ``budget.count_always_trained``: ``False`` matches candidate
    entries, ``True`` total trainable entries (our always-trained entries, e.g. the head, then
    count against the budget). ``model`` is ours; it is built here when needed and not given.
    Models built here do not advance the run's random number generators.
    """
    budget = cfg.get("budget") or {}
    kept, r = budget.get("kept"), budget.get("r")
    if kept is None and r is None:
        return None
    count_always_trained = bool(budget.get("count_always_trained") or False)
    include, exclude = fish_kwargs.get("include"), fish_kwargs.get("exclude")
    if r is None and not count_always_trained:
        return int(kept)
    with torch.random.fork_rng(devices=[]):
        if r is None:
            reference: torch.nn.Module | int = int(kept)
        else:  # the same peft method at rank r
            ref_peft = OmegaConf.to_container(cfg.peft, resolve=True)
            ref_peft["r"] = int(r)
            reference = build_model(cfg, ref_peft)
        if not count_always_trained:  # our candidate count is checked against it in build_fish
            return count_candidates(reference, include, exclude)
        if model is None:
            model = build_model(cfg)
        return match_kept(model, reference, include, exclude, count_always_trained=True)


def build_fish(cfg: DictConfig, model: torch.nn.Module) -> tuple[FisherMaskCallback | None, dict[str, Any]]:
    """The FISH callback (``None`` when fish=off), with the sparsity resolved from the budget."""
    if not fish_enabled(cfg):
        return None, {}
    kwargs = fish_kwargs(cfg)
    info: dict[str, Any] = {}
    kept = _budget_kept(cfg, kwargs, model)
    if kept is not None:
        names = set(find_candidates(model, kwargs.get("include"), kwargs.get("exclude")))
        n = sum(p.numel() for name, p in model.named_parameters() if name in names)
        kwargs["sparsity"] = sparsity_for_kept(n, kept)
        info = {"budget_kept": kept, "sparsity_from_budget": kwargs["sparsity"]}
        log.info(f"budget: keep {kept:,} of {n:,} candidates -> sparsity {kwargs['sparsity']:.6f}")
    return FisherMaskCallback(**kwargs), info


def train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Build everything from ``cfg``, fit (from ``out_dir``'s last checkpoint with ``resume``), save what was
    trained, and return the result record (without status)."""
    _validate(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = instantiate(cfg.data)
    _check_causal_pairing(cfg, data)
    model = build_model(cfg)
    fish, budget_info = build_fish(cfg, model)
    run_config = OmegaConf.to_container(cfg, resolve=True)  # the module's hyperparameters: loggers record them
    if is_causal_lm(cfg):
        module: pl.LightningModule = CausalLM(model, **cfg.optim, run_config=run_config)
    else:
        module = SequenceClassifier(model, num_labels=data.num_labels, metrics=data.metrics, **cfg.optim,
                                    run_config=run_config)  # fmt: skip
    ckpt_path = start_checkpoint(cfg, out_dir)
    monitor = (f"val/{data.metrics[0]}", getattr(data, "primary_metric_mode", "max"))
    trainer = build_trainer(cfg, out_dir, fish, resuming=ckpt_path is not None, monitor=monitor)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if not metrics and ckpt_path is not None:  # resumed from the end of a finished run: nothing left to train
        trainer.validate(module, datamodule=data, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    mode = getattr(data, "primary_metric_mode", "max")  # "min" for losses (causal LMs)
    record: dict[str, Any] = {"metrics": metrics, "primary_metric": f"val/{data.metrics[0]}",
                              "primary_metric_mode": mode, "resumed_from": ckpt_path, **budget_info}  # fmt: skip
    record.update(_counts(fish, count_trainable(model)))
    if trainer.is_global_zero:
        label = f"{cfg.data.task} · {method_label(cfg)}"
        settings = {"model_net": OmegaConf.to_container(cfg.model.net, resolve=True),
                    "peft": OmegaConf.to_container(cfg.peft, resolve=True), "tokenizer": cfg.model.get("tokenizer")}
        record["artifacts"] = save_artifacts(out_dir, module, fish, export=bool(cfg.get("export")), label=label,
                                             settings=settings)  # fmt: skip
        if "export" in record["artifacts"]:
            record["export"] = record["artifacts"].pop("export")
    return record


def start_checkpoint(cfg: DictConfig, out_dir: Path) -> str | None:
    """Where fit starts from: ``ckpt_path`` (any Lightning checkpoint of this model), else with ``resume`` the run's
    ``checkpoints/last.ckpt`` (:func:`~fish_lightning.app.checkpointing.resume_path`), else ``None``."""
    given = cfg.get("ckpt_path")
    if given is None:
        return resume_path(out_dir, bool(cfg.get("resume")))
    if cfg.get("resume"):
        raise ConfigError(f"ckpt_path={given!r} and resume=true are both set: set one (resume continues "
                          "<run dir>/checkpoints/last.ckpt)")  # fmt: skip
    if not Path(str(given)).expanduser().is_file():
        raise ConfigError(f"ckpt_path={given!r} is not a file: give a Lightning checkpoint (.ckpt) of this model")
    return str(Path(str(given)).expanduser())


def build_trainer(cfg: DictConfig, out_dir: Path, fish: FisherMaskCallback | None, resuming: bool = False,
                  monitor: tuple[str, str] | None = None) -> pl.Trainer:  # fmt: skip
    """The ``cfg.trainer`` Trainer with the FISH callback, ``cfg.callbacks``, checkpoints (a best one on ``monitor``
    = ``(metric, "max" | "min")``), a learning-rate monitor and loggers (``resuming``: their latest versions)."""
    loggers = [instantiate(lg, **continued_version(lg, resuming)) for lg in (cfg.get("logger") or {}).values()]
    checkpoints = checkpoint_callbacks((cfg.get("checkpoint") or {}).get("every_n_train_steps"), out_dir, monitor)
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if loggers and cfg.get("lr_monitor", True):
        from lightning.pytorch.callbacks import LearningRateMonitor

        extra.append(LearningRateMonitor(logging_interval="step"))
    callbacks = ([fish] if fish is not None else []) + extra + checkpoints
    options: dict[str, Any] = {"enable_checkpointing": True} if checkpoints else {}
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **options)


def continued_version(logger_cfg: Any, resuming: bool) -> dict[str, Any]:
    """``{"version": N}`` for a CSV/TensorBoard logger config without an explicit version when resuming and
    ``<save_dir>/<name>/version_N`` exists (the latest), so a resumed run's curves continue in one version."""
    if not resuming or logger_cfg.get("version") is not None or "save_dir" not in logger_cfg:
        return {}
    root = Path(str(logger_cfg["save_dir"])) / str(logger_cfg.get("name") or "lightning_logs")
    versions = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    return {"version": max(versions)} if versions else {}


def _counts(fish: FisherMaskCallback | None, dense_trainable: int) -> dict[str, Any]:
    """Candidates, kept and trainable entries of the run (``None`` where FISH is off)."""
    if fish is None:
        return dict(candidates=None, kept=None, trainable_params=dense_trainable, always_trained=None, sparsity=None)
    if fish.masks is None:
        raise RuntimeError("FISH never froze a mask: the run ended before the freeze point (check mask_epoch)")
    non_candidates = dense_trainable - fish.num_candidates
    return dict(candidates=fish.num_candidates, kept=fish.num_kept, trainable_params=fish.num_kept + non_candidates,
                always_trained=non_candidates, sparsity=fish.sparsity)  # fmt: skip


def _base_record(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    return {
        "status": "running",
        "error": None,
        "task": cfg.data.task,
        "model": cfg.model.name,
        "peft": cfg.peft.method,
        "fish": cfg.fish.selection if fish_enabled(cfg) else "off",
        "method": method_label(cfg),
        "group": " ".join(sorted(o for o in overrides if not o.lstrip("+~").startswith("seed="))),
        "seed": cfg.seed,
        "sparsity": cfg.fish.sparsity if fish_enabled(cfg) else None,
        "overrides": overrides,
    }


def run(cfg: DictConfig, out_dir: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, and always write ``results.json`` to the run directory (also when the run fails).

    ``out_dir``/``overrides`` default to the current Hydra job's; pass them to drive runs from a
    config composed with ``hydra.compose`` (e.g. ``scripts/reproduce.py``).
    """
    if out_dir is None:
        out_dir = HydraConfig.get().runtime.output_dir
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    quiet_start()
    run_log.attach()  # Lightning's and FISH's lines in Hydra's train.log too
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    record = _base_record(cfg, overrides)
    start = time.time()
    try:
        record.update(train(cfg, out_dir))
        record["status"] = "ok"
    except Exception as err:
        cause = config_error(err) or err
        record.update(status="failed", error=f"{type(cause).__name__}: {cause}", traceback=traceback.format_exc())
        raise
    finally:
        record["wall_time_s"] = round(time.time() - start, 2)
        (out_dir / "results.json").write_text(json.dumps(record, indent=1))
        if record["status"] == "failed":
            run_log.to_file(f"failed: {record['error']}")
        run_log.detach()
    primary = record["primary_metric"]
    value = record["metrics"].get(primary, float("nan"))
    line = (f"{record['method']} on {record['task']}: {primary} = {value:.4f}; trainable "
            f"{record['trainable_params']:,}; {record['wall_time_s']:.0f} s; results in {out_dir}")  # fmt: skip
    print(line)
    run_log.to_file(line)
    return record


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_start()
    try:
        record = run(cfg)
    except Exception as err:
        bad = config_error(err)
        if bad is None or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"fish-train: error: {one_line(bad)}", file=sys.stderr)
        raise SystemExit(2) from None
    return record["metrics"].get(record["primary_metric"])  # for Hydra sweepers (e.g. Optuna)


if __name__ == "__main__":
    main()
