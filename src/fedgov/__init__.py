"""fedgov: measure what decentralizing AI costs, with Flower, PyTorch, Opacus and TenSEAL."""

from typing import Any

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m fedgov.<module>` does not import that module twice.
    if name in ("Config", "ConfigError", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'fedgov' has no attribute {name!r}")
