"""Make a saved adapter folder travel: a portable base id, what the model needs besides the adapter, a model card.

``peft``'s ``save_pretrained`` records ``base_model_name_or_path`` as the path the base was loaded from (for the
packaged MiniLM: a site-packages directory of one machine; ``null`` for a model built from a config), and knows
nothing of the classifier's size or of a mean-pooled head. :func:`make_portable` rewrites the folder after saving:

- ``adapter_config.json``: ``base_model_name_or_path`` = :func:`portable_base_id` (a hub id, never a local path);
- ``fish_lightning.json`` (:data:`RUN_META`): the task (``sequence_classification`` | ``causal_lm``), the portable
  base id, ``num_labels``, ``pooling`` (``mean`` | ``cls``), the peft method and the ``model.net`` / ``peft``
  settings that rebuild the model (read by :func:`fish_lightning.load_run`);
- ``README.md``: a model card whose first lines say how to load the adapter, and, where peft's
  ``AutoPeftModel...`` classes cannot rebuild the model (a mean-pooled head, a base built from a config), say so.

Pure Python + torch; no Lightning import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

RUN_META = "fish_lightning.json"
RUN_META_FORMAT = "fish-lightning-adapter"
#: our model names -> their hub ids (the packaged MiniLM is sentence-transformers' all-MiniLM-L6-v2)
KNOWN_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def portable_base_id(name_or_path: str | None) -> str | None:
    """The hub id of a base given as ``name_or_path``: our packaged names (``"minilm"``) map to theirs
    (:data:`KNOWN_HUB_IDS`), a hub id stays; a local directory, an absolute path or ``None`` (a model built from
    a config) gives ``None``."""
    if not name_or_path:
        return None
    if name_or_path in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[name_or_path]
    if Path(name_or_path).expanduser().exists() or not _HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        return None
    return name_or_path


def model_pooling(model: nn.Module) -> str | None:
    """``"mean"`` when ``model``'s head reads a :class:`~fish_lightning.adapters.pooling.MeanPooler`, ``"cls"`` for
    another classifier, ``None`` for a model without ``num_labels`` (a causal LM)."""
    from fish_lightning.adapters.pooling import MeanPooler

    if any(isinstance(m, MeanPooler) for m in model.modules()):
        return "mean"
    return "cls" if _num_labels(model) is not None else None


def _num_labels(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None or not any(a.endswith("ForSequenceClassification") for a in _architectures(model)):
        return None
    return int(config.num_labels)


def _architectures(model: nn.Module) -> list[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [type(base).__name__]


def run_meta(model: nn.Module, model_net: dict[str, Any] | None, peft: dict[str, Any] | None,
             tokenizer: str | None = None) -> dict[str, Any]:  # fmt: skip
    """What :data:`RUN_META` holds for the trained ``model`` built from ``model_net`` (the run's ``model.net``
    settings, plain) wrapped with ``peft`` (its ``peft`` settings); ``tokenizer`` as ``model.tokenizer``."""
    name = (model_net or {}).get("name_or_path")
    num_labels = _num_labels(model)
    return {
        "format": RUN_META_FORMAT,
        "version": 1,
        "task": "sequence_classification" if num_labels is not None else "causal_lm",
        "base_model": portable_base_id(name),
        "base_built_from_config": bool((model_net or {}).get("tiny_config")),
        "num_labels": num_labels,
        "pooling": model_pooling(model),
        "peft_method": (peft or {}).get("method"),
        "model_net": model_net,
        "peft": peft,
        "tokenizer": tokenizer,
    }


def make_portable(adapter_dir: str | Path, model: nn.Module, model_net: dict[str, Any] | None = None,
                  peft: dict[str, Any] | None = None, tokenizer: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Rewrite the adapter folder that ``model.save_pretrained(adapter_dir)`` (or our bottleneck adapters' save)
    wrote (module doc); returns the :data:`RUN_META` record."""
    adapter_dir = Path(adapter_dir)
    meta = run_meta(model, model_net, peft, tokenizer)
    config_file = adapter_dir / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = meta["base_model"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / RUN_META).write_text(json.dumps(meta, indent=1) + "\n")
    (adapter_dir / "README.md").write_text(model_card(meta, peft_format=config_file.is_file()))
    return meta


def _base_expression(meta: dict[str, Any]) -> str:
    """Python that builds the base the run used (before the adapter)."""
    net = meta.get("model_net") or {}
    target = str(net.get("_target_", ""))
    args = {k: v for k, v in net.items() if not k.startswith("_")}
    if meta["task"] == "sequence_classification":
        args["pooling"] = meta["pooling"]  # resolved: "auto" becomes what the run used
    default = "build_causal_lm" if meta["task"] == "causal_lm" else "build_sequence_classifier"
    fn = target.rsplit(".", 1)[-1] or default
    return f"{fn}(**{args!r})"


def model_card(meta: dict[str, Any], peft_format: bool = True) -> str:
    """The adapter's ``README.md``: front matter, then how to load it (module doc)."""
    base, task, labels, pooling = meta["base_model"], meta["task"], meta["num_labels"], meta["pooling"]
    what = f"{task.replace('_', ' ')}" + (f", {labels} label{'s' if labels != 1 else ''}, {pooling} pooling"
                                         if task == "sequence_classification" else "")  # fmt: skip
    front = ["---", "library_name: peft" if peft_format else "library_name: fish-lightning"]
    if base:
        front.append(f"base_model: {base}")
    front += ["tags:", "- fish-lightning", f"- {meta.get('peft_method') or 'adapter'}", "---", ""]
    lines = [
        f"# {meta.get('peft_method') or 'adapter'} adapter on {base or 'a base built from a config'} ({what})",
        "",
        "Trained with fish-lightning (FISH-Tuning). The whole model (base, adapter, head, pooling), offline, in "
        "eval mode:",
        "",
        "```python",
        "from fish_lightning import load_run",
        'model = load_run("<this folder or the run directory holding it>")',
        "```",
        "",
    ]
    auto = "AutoPeftModelForCausalLM" if task == "causal_lm" else "AutoPeftModelForSequenceClassification"
    if pooling == "mean":
        lines += [f"peft's `{auto}` cannot rebuild this model: its classifier reads the attention-masked mean of "
                  "the token states (`fish_lightning.adapters.pooling.MeanPooler` in place of BERT's pooler), which "
                  "no transformers config records; it would load silently wrong.", ""]  # fmt: skip
    elif not base:
        lines += [f"peft's `{auto}` cannot rebuild this model: its base was built from a config "
                  f"(`model_net` in `{RUN_META}`), not loaded from the hub.", ""]  # fmt: skip
    elif peft_format:
        extra = f', num_labels={labels}' if labels is not None else ""
        lines += [f"With peft alone: `{auto}.from_pretrained(\"<this folder>\"{extra})`.", ""]
    if peft_format:
        lines += ["With peft on the base the run used: `PeftModel.from_pretrained(base, \"<this folder>\")`, "
                  "where (`from fish_lightning.adapters.models import build_sequence_classifier`, or "
                  "`fish_lightning.adapters.decoders.build_causal_lm` for a causal LM):", "",
                  "```python", f"base = {_base_expression(meta)}", "```", ""]  # fmt: skip
    else:
        lines += ["The trainable tensors are in `trainable.safetensors` (names as in the model's "
                  "`named_parameters()`); our bottleneck adapters are not peft's.", ""]  # fmt: skip
    lines += [f"`{RUN_META}` records the base, the head size (`num_labels`), the pooling and the settings that "
              "rebuild the model."]  # fmt: skip
    return "\n".join(front + lines) + "\n"
