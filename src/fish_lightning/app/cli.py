"""``fish-cli``: LightningCLI over :class:`PeftSequenceClassifier` and ``data.TextClassificationData``.

The FISH mask is an ordinary Trainer callback in the YAML::

    trainer:
      callbacks:
        - class_path: fish_lightning.FisherMaskCallback
          init_args: {sparsity: 0.9, warmup_steps: 50, mask_epoch: 1}

``fish-cli fit --config sst2_lora_fish`` (also ``validate``, ``test``, ``--print_config``): ``--config NAME``
names a LightningCLI example shipped in the package when no file ``NAME`` exists; ``fish-cli examples`` lists
them and ``fish-cli examples NAME`` prints one (to copy and edit). ``model.num_labels`` and ``model.metrics`` are
taken from the data module's task. A value our classes refuse (``sparsity=1.5``, an unknown peft method or task)
ends the command with one line naming it.
Needs ``pip install "fish-lightning[cli]"`` (``jsonargparse[signatures]``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from fish_lightning.adapters.models import apply_peft, build_peft_model, build_sequence_classifier
from fish_lightning.app.classification_data import TextClassificationData
from fish_lightning.app.classifier import SequenceClassifier
from fish_lightning.app.errors import config_error, missing_extra, one_line
from fish_lightning.app.quiet import TRAINER_DEFAULTS, quiet_start, show_fish_lines


class PeftSequenceClassifier(SequenceClassifier):
    """A :class:`~fish_lightning.app.classifier.SequenceClassifier` that builds its peft-wrapped model from plain
    settings.

    Args:
        model_name: a local directory or hub id for ``from_pretrained``, or ``"minilm"`` (the packaged, offline
            MiniLM-L6); ``None`` with ``tiny_config``.
        num_labels: classes (``1``: regression); ``fish-cli`` links it to ``data.num_labels``.
        peft: a method of :data:`fish_lightning.adapters.models.PEFT_METHODS` (``"none"``: full fine-tuning).
        peft_kwargs: options of that method's config, e.g. ``{r: 8, lora_alpha: 16, target_modules: [query, value]}``.
        tiny_config: ``BertConfig`` options of a small randomly initialised BERT (tests, smoke runs).
        model_kwargs: further options of :func:`~fish_lightning.adapters.models.build_sequence_classifier`.
        seed: seed of the tiny model's weights and of the LoRA/DoRA/rsLoRA adapter init (per-tensor seeds).
        metrics, lr, weight_decay, warmup_ratio: as :class:`~fish_lightning.app.classifier.SequenceClassifier`
            (``fish-cli`` links ``metrics`` to ``data.metrics``).
    """

    def __init__(
        self,
        model_name: str | None = "minilm",
        num_labels: int = 2,
        peft: str = "lora",
        peft_kwargs: dict[str, Any] | None = None,
        tiny_config: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        metrics: tuple[str, ...] | list[str] = ("accuracy",),
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float | None = 0.06,
    ) -> None:
        if model_name is None and tiny_config is None:
            raise ValueError("model_name=None needs tiny_config: set model_name (e.g. 'minilm') or tiny_config")
        net = build_peft_model(
            lambda: build_sequence_classifier(model_name, num_labels, tiny_config, seed, **(model_kwargs or {})),
            lambda base: apply_peft(base, peft, **(peft_kwargs or {})),
            peft,
            seed,
        )
        super().__init__(net, num_labels=num_labels, metrics=metrics, lr=lr, weight_decay=weight_decay,
                         warmup_ratio=warmup_ratio)  # fmt: skip
        self.save_hyperparameters()  # load_from_checkpoint rebuilds the same model from these settings


class CLIConfigError(ValueError):
    """A value refused while building the model, data or callbacks from the parsed config."""


class FishCLI(LightningCLI):
    """LightningCLI that takes ``model.num_labels``/``model.metrics`` from the data module's task."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data.metrics", "model.metrics", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # our constructors' messages name the bad value and what would be valid
            # the deepest one: the constructor's own, under jsonargparse's wrappers (which list every type of a
            # Union the value failed, e.g. for trainer.callbacks)
            ours = config_error(err, innermost=True)
            if ours is None:  # not one of fish's refusals: keep the traceback
                raise
            raise CLIConfigError(one_line(ours)) from err


def cli_main(args: ArgsType = None, run: bool = True, **kwargs: Any) -> FishCLI:
    """Build (and with ``run=True`` run the subcommand of) :class:`FishCLI`; ``args`` as for ``LightningCLI``."""
    kwargs.setdefault("seed_everything_default", 0)
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs["trainer_defaults"] = {**TRAINER_DEFAULTS, **(kwargs.get("trainer_defaults") or {})}
    return FishCLI(PeftSequenceClassifier, TextClassificationData, args=args, run=run, **kwargs)


EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "lightning_cli"


def examples() -> dict[str, Path]:
    """The LightningCLI examples shipped in the package: name -> YAML file."""
    return {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}


def _find_configs(argv: list[str]) -> list[str]:
    """``--config NAME`` (or ``--config=NAME``) -> the shipped example's path, where no file ``NAME`` exists."""
    out, known = list(argv), examples()
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            j, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            j, value = i, arg.split("=", 1)[1]
        else:
            continue
        name = value.removesuffix(".yaml")
        if not Path(value).exists() and name in known:
            out[j] = str(known[name]) if j != i else f"--config={known[name]}"
    return out


def _print_examples(argv: list[str]) -> None:
    known = examples()
    if not argv:
        print(f"LightningCLI examples in {EXAMPLES_DIR} (run one with `fish-cli fit --config NAME`, print it with "
              "`fish-cli examples NAME`):")  # fmt: skip
        for name, path in known.items():
            print(f"  {name}: {path.read_text().splitlines()[0].lstrip('# ')[:100]}")
        return
    name = argv[0].removesuffix(".yaml")
    if name not in known:
        print(f"fish-cli: error: no example {argv[0]!r}: expected one of {sorted(known)}", file=sys.stderr)
        raise SystemExit(2)
    print(known[name].read_text(), end="")


def main(args: ArgsType = None) -> None:
    """Console entry ``fish-cli``: a refused value exits with status 2 and one ``fish-cli: error: ...`` line;
    ``fish-cli examples [NAME]`` lists (prints) the shipped examples."""
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv is not None and argv[:1] == ["examples"]:
        _print_examples(argv[1:])
        return
    problem = missing_extra("jsonargparse")
    if problem:
        print(f"fish-cli: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    quiet_start()
    show_fish_lines()
    if argv is not None:
        args = _find_configs(argv)
    try:
        cli_main(args)
    except CLIConfigError as err:
        print(f"fish-cli: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
