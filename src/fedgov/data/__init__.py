"""fedgov's data: datasets, partitions into cooperatives, and the federation built from them.

Only numpy is imported here; scikit-learn, pandas, ``datasets`` and ``flwr_datasets`` are
imported when a dataset is loaded or partitioned, so ``import fedgov.data`` stays fast.
"""

from fedgov.data.datasets import DataError, LoadedData, load_dataset
from fedgov.data.federation import (
    Cooperative,
    Federation,
    Split,
    build_federation,
    clear_cache,
    federation_summary,
)
from fedgov.data.partition import partition_indices

__all__ = [
    "Cooperative",
    "DataError",
    "Federation",
    "LoadedData",
    "Split",
    "build_federation",
    "clear_cache",
    "federation_summary",
    "load_dataset",
    "partition_indices",
]
