"""The one error type of :mod:`detlens.data`."""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad dataset input: the message names the file and the record (image id, annotation id)."""
