"""Features room: the Feast repository (``features/repo``) and typed read/write helpers.

The read API is importable from here (loaded on first use, Feast only when a read needs it)::

    from features import read_group_rows, resolve_group, training_frame

See ``docs/features.md``.
"""

from __future__ import annotations

from typing import Any

_READ_API = {"FeatureReader", "GroupRows", "ProductFeatures", "read_group_rows", "resolve_group",
             "training_frame"}

__all__ = sorted(_READ_API)


def __getattr__(name: str) -> Any:
    if name in _READ_API:
        from features import read

        return getattr(read, name)
    raise AttributeError(f"module 'features' has no attribute {name!r}")
