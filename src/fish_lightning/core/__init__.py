"""Pure torch core: candidates, exact-k selection, masking, compact optimizer state, sharding, budgets and
Fisher estimators. Imports no Lightning, Hydra, omegaconf, transformers or peft (tests/test_layers.py)."""
