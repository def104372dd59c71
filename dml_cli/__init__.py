"""Deep Mutual Learning for cohorts of neural networks, driven by Hydra configs."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["DML", "__version__"]

if TYPE_CHECKING:
    from dml_cli.api import DML


def __getattr__(name: str):
    # The Python API is imported on first use, so the console scripts do not load it.
    if name == "DML":
        from dml_cli.api import DML

        return DML
    raise AttributeError(f"module 'dml_cli' has no attribute {name!r}")
