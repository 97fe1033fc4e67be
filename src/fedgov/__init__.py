"""fedgov: measure what decentralizing AI costs, with Flower, PyTorch, Opacus and TenSEAL."""

from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
__version__ = "0.1.0"
