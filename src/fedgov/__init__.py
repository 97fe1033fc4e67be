"""fedgov: measure what decentralizing AI costs, with Flower, PyTorch, Opacus and TenSEAL.

The package itself imports nothing, so that ``python -m fedgov.<module>`` runs each module once;
the typed config is ``fedgov.config`` (``Config``, ``load_config``).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
