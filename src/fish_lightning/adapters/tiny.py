"""Tiny random model configs (tests, benchmarks, smoke runs): one place for the dimensions.

``tiny_config("bert")`` is a ``BertConfig`` field dict for
:func:`fish_lightning.adapters.models.build_sequence_classifier` (``tiny_config=``);
``tiny_config("gpt2")`` / ``tiny_config("llama")`` include ``model_type`` for
:func:`fish_lightning.adapters.decoders.build_causal_lm`. Keyword arguments override or add fields.
The Hydra options ``model=tiny_bert|tiny_gpt2|tiny_llama`` use the same dimensions with MiniLM's
vocabulary (30522 tokens). Dropout is off by default, so a tiny run is deterministic in train mode too.
"""

from __future__ import annotations

from typing import Any

#: architecture -> config fields: 2 layers, 32 wide, small vocabulary and positions, no dropout.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "gpt2": dict(model_type="gpt2", vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    "llama": dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2),
}  # fmt: skip


def tiny_config(arch: str = "bert", **overrides: Any) -> dict[str, Any]:
    """A fresh copy of :data:`TINY_CONFIGS` ``[arch]`` with ``overrides`` applied."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch={arch!r} is not valid: expected one of {sorted(TINY_CONFIGS)}")
    return {**TINY_CONFIGS[arch], **overrides}
