"""Hydra configs of fish-train (a package so an installed wheel finds them)."""
