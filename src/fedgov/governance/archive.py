"""Updates retained with a run, so that an auditor can later attribute what happened.

Layout under ``RUN_DIR/updates/``::

    round_0005/global.npz      the global model the cohort received in round 5
    round_0005/coop_003.npz    cooperative 3's trained model (plaintext runs)
    round_0005/coop_003.he     cooperative 3's ciphertext, byte for byte as received (HE runs)

The audit log holds the digest of each, so a retained file that was swapped or edited
afterwards is caught by ``python -m fedgov.audit trace``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ARCHIVE_DIR", "UpdateArchive"]

ARCHIVE_DIR = "updates"


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    # Like fedgov.results.atomic_write_bytes but without fsync: these files are written on
    # every round's path, and the signed digests in the audit log catch a torn one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class UpdateArchive:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / ARCHIVE_DIR

    def round_dir(self, server_round: int) -> Path:
        return self.root / f"round_{server_round:04d}"

    def save_arrays(self, server_round: int, name: str, arrays: Sequence[np.ndarray]) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, *[np.asarray(a) for a in arrays])
        path = self.round_dir(server_round) / f"{name}.npz"
        _write_atomic(path, buffer.getvalue())
        return path

    def save_npy(self, server_round: int, name: str, npy_files: Sequence[bytes]) -> Path:
        """As :meth:`save_arrays`, from arrays already in ``.npy`` form as messages carry them: the
        bytes as received, without decoding and encoding them again."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for i, data in enumerate(npy_files):
                archive.writestr(f"arr_{i}.npy", data)
        path = self.round_dir(server_round) / f"{name}.npz"
        _write_atomic(path, buffer.getvalue())
        return path

    def save_bytes(self, server_round: int, name: str, data: bytes | memoryview) -> Path:
        path = self.round_dir(server_round) / f"{name}.he"
        _write_atomic(path, data)
        return path

    @staticmethod
    def load_arrays(path: Path) -> list[np.ndarray]:
        with np.load(path) as data:
            return [data[f"arr_{i}"] for i in range(len(data.files))]

    def rounds(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name.split("_")[1]) for p in self.root.glob("round_*") if p.is_dir())

    def cooperative_files(self, server_round: int) -> dict[int, Path]:
        """Retained updates of one round by cooperative id (``.npz`` or ``.he``)."""
        out: dict[int, Path] = {}
        for path in sorted(self.round_dir(server_round).glob("coop_*")):
            if path.suffix in (".npz", ".he"):
                out[int(path.stem.split("_")[1])] = path
        return out

    def global_file(self, server_round: int) -> Path:
        return self.round_dir(server_round) / "global.npz"
