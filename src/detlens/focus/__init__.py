"""detlens.focus: focus records (what the explaining callbacks saw), drift between logging
points and runs, and the HTML report behind ``detlens compare`` / ``detlens report``.

Submodules: :mod:`~detlens.focus.record` (format, writer, reader),
:mod:`~detlens.focus.drift` (matching, map similarity, entropy drift, focus metrics),
:mod:`~detlens.focus.compare` (baseline vs candidate, curves over training),
:mod:`~detlens.focus.report` (HTML).
"""
