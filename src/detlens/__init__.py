"""detlens."""
