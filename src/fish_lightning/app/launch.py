"""The ``fish-train`` command: its help (without importing torch), the extras a launcher needs, then the app.

``fish-train --help`` prints what the app does, the experiments and config groups read from the packaged configs,
and how to add one's own (``--config-dir``); ``--hydra-help`` is Hydra's own page. A launcher or sweeper
whose package is missing (``hydra/launcher=local_parallel`` without ``fish-lightning[sweep]``) ends with one
line naming the pip command. Everything else goes to :func:`fish_lightning.app.train.main`.
"""

from __future__ import annotations

import sys
import textwrap
from importlib import resources

from fish_lightning.app.errors import missing_extra

#: override -> the module it needs (see :data:`fish_lightning.app.errors.EXTRAS`)
OVERRIDE_NEEDS = {
    "hydra/launcher=local_parallel": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/sweeper=optuna_lr_sparsity": "hydra_plugins.hydra_optuna_sweeper",
}
GROUPS = ("model", "peft", "fish", "data", "trainer", "logger")


def _conf():  # the packaged config folder
    return resources.files("fish_lightning") / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in (_conf() / group).iterdir() if p.name.endswith(".yaml"))


def _summary(group: str, option: str) -> str:
    """The first sentence of an option's leading YAML comment (after ``# @package``)."""
    words: list[str] = []
    for line in (_conf() / group / f"{option}.yaml").read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if not line.startswith("# ") or line.startswith("#  "):  # end of the prose (code, or an indented example)
            break
        words.append(line[2:].strip())
        if words[-1].endswith("."):
            break
    text = " ".join(words)
    return text.split(". ")[0].rstrip(".:") + "."


def app_help() -> str:
    """The text of ``fish-train --help``."""
    experiments = "\n".join(textwrap.fill(_summary("experiment", name), 118, initial_indent=f"  {name:<20} ",
                                           subsequent_indent=" " * 23) for name in _options("experiment"))  # fmt: skip
    groups = "\n".join(f"  {g:<8} {', '.join(_options(g))}" for g in GROUPS)
    return f"""\
fish-train: fine-tune a model with a PEFT method and a FISH-Tuning mask (only the entries with the highest
Fisher information train), write the trained adapter, the mask and the metrics to one folder per run.

usage:
  fish-train [GROUP=OPTION ...] [KEY=VALUE ...]     one run, in outputs/<date>/<time>/ (hydra.run.dir=DIR)
  fish-train -m KEY=A,B [KEY=C,D ...]               a sweep, one run per combination, in multirun/<date>/<time>/
  fish-report DIR                                   a sweep's table (mean +- std over seeds) and figures

  The default (no arguments): MiniLM-L6 + LoRA r=8 + FISH at 90% sparsity on tweets (3 classes), offline.

experiments (experiment=NAME):
{experiments}

config groups (GROUP=OPTION):
{groups}

common settings:
  fish.sparsity=0.9 fish.warmup_steps=50 fish.mask_epoch=1   budget.r=2 (mask sized to LoRA r=2's count)
  optim.lr=5e-4 trainer.max_epochs=2 seed=0 data.train_samples=N resume=true export=true

configs:
  the packaged ones: {_conf()}
  your own: --config-dir DIR, with e.g. DIR/experiment/mine.yaml (starting `# @package _global_`), then
  experiment=mine; the composed config of any command line: fish-train ... --cfg job

  fish-train --hydra-help: Hydra's own options (launchers, sweepers, logging, tab completion).
"""


def main() -> None:
    """Console entry ``fish-train``."""
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(app_help(), end="")
        return
    for arg in args:
        module = OVERRIDE_NEEDS.get(arg.lstrip("+"))
        problem = missing_extra(module) if module else None
        if problem:
            print(f"fish-train: error: {problem}", file=sys.stderr)
            raise SystemExit(2)
    from fish_lightning.app.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
