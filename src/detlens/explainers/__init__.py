"""detlens.explainers."""
