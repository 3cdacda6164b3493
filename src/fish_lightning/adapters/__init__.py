"""Models and PEFT methods: sequence classifiers and causal LMs with peft (``models``, ``decoders``), our
bottleneck adapters (``bottleneck``), seeded adapter initialisation (``seeded_init``) and the sparse export
(``export``). Depends on the core, never on the Lightning callback or the app.

``from fish_lightning.adapters import BottleneckAdapter, add_adapters`` keeps working (this package replaced
the module ``fish_lightning.adapters`` of 0.1.0).
"""

from fish_lightning.adapters.bottleneck import BottleneckAdapter, add_adapters

__all__ = ["BottleneckAdapter", "add_adapters"]
