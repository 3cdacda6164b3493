"""The experiment harness: ``fish-train`` (Hydra), ``fish-cli`` (LightningCLI), ``fish-report``, the
LightningModules, data modules and Hydra callbacks. Nothing outside ``app`` imports it."""
