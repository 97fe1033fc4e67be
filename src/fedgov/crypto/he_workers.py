"""Worker processes for encryption (TenSEAL holds the GIL, so threads do not help).

:func:`_encrypt_blocks` encrypts one update's blocks over ``workers`` processes, this
one included. Blocks and ciphertexts travel through files in the private scratch
folders of :mod:`fedgov.crypto.he_scratch` rather than the pool's pipe: a
10^7-parameter update is ~200 MB each way, and piping it through a parent busy
encrypting its own share (TenSEAL holds the GIL) slowed the worker's share down. A
file of plaintext values is removed as soon as the worker has read it (and by this
process if the worker never did); folders of killed processes are removed when the
pool next starts.
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import os
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .he_codec import _encrypt_one
from .he_keys import _Context
from .he_presets import HEError, HEPreset
from .he_scratch import remove_stale_scratch, scratch_path
from .he_wire import _U32, _wire_chunks

if TYPE_CHECKING:
    import tenseal as ts

__all__ = ["default_workers", "shutdown_workers"]

_POOL: ProcessPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_POOL_BROKEN = False  # set when worker processes cannot run here (e.g. a __main__ read from stdin)
_WORKER_CONTEXTS: dict[bytes, ts.Context] = {}
_SCRATCH_LOCK = threading.Lock()


def default_workers() -> int:
    """Processes used to encrypt: ``FEDGOV_HE_WORKERS`` if set, else the CPUs this process may use."""
    env = os.environ.get("FEDGOV_HE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise HEError(f"FEDGOV_HE_WORKERS must be an integer, not {env!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _get_pool(n: int) -> ProcessPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != n:
            if _POOL is not None:
                _POOL.shutdown(wait=False, cancel_futures=True)
            remove_stale_scratch()  # folders (and plaintext blocks) of killed processes
            # spawn: safe in processes that already run threads (Ray actors, torch)
            _POOL = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
            _POOL_SIZE = n
        return _POOL


def shutdown_workers() -> None:
    """Stop the encryption worker processes (they are also stopped at exit)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL, _POOL_SIZE = None, 0


atexit.register(shutdown_workers)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        _remove(path)


def _read_plaintext_block(path: str, dtype: str) -> np.ndarray:
    """The values in ``path``; the file is removed as soon as they are read (or could not be)."""
    try:
        return np.fromfile(path, dtype=np.dtype(dtype))
    finally:
        _remove(path)


def _write_plaintext_block(path: str, blocks: list[np.ndarray]) -> None:
    """Store ``blocks`` one after another in a fresh file, readable by this user only."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.writelines(np.ascontiguousarray(b).data.cast("B") for b in blocks)  # block by block: no copy


def _worker_encrypt(token: bytes, ctx_bytes: bytes, preset_json: str, in_path: str, dtype: str,
                    lengths: list[int], out_path: str) -> None:
    """Encrypt the blocks stored one after another in ``in_path`` (removed once read); write
    them to ``out_path`` as they go on the wire (each ciphertext after its uint32 length)."""
    import tenseal as ts

    values = _read_plaintext_block(in_path, dtype)
    ctx = _WORKER_CONTEXTS.get(token)
    if ctx is None:
        if len(_WORKER_CONTEXTS) >= 4:
            _WORKER_CONTEXTS.clear()
        ctx = _WORKER_CONTEXTS[token] = ts.context_from(ctx_bytes, n_threads=1)
    preset = HEPreset.from_json(preset_json)
    bounds = np.cumsum([0, *lengths]).tolist()
    with _overwrite(out_path) as f:
        for i in range(len(lengths)):
            chunk = _encrypt_one(ctx, preset, values[bounds[i]:bounds[i + 1]])
            f.write(_U32.pack(len(chunk)))
            f.write(chunk)
        f.truncate()


def _overwrite(path: str) -> Any:
    """Open ``path`` for writing from the start without truncating it first: a tmpfs file
    keeps its pages, so rewriting it each round skips allocating ~100 MB of fresh memory.
    (For ciphertexts only: a file of plaintext values is removed once read.)"""
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b")


def _encrypt_blocks(context: _Context, blocks: list[np.ndarray], workers: int) -> list[bytes]:
    """Encrypt ``blocks`` (one ciphertext each), over ``workers`` processes counting this one.

    Returns the chunk section of the update's wire format (without the count), in pieces.
    """
    local = context.tenseal_context, context.preset
    if workers <= 1 or len(blocks) < 2 * workers or _POOL_BROKEN:
        return _wire_chunks([_encrypt_one(*local, b) for b in blocks])
    ctx_bytes = context._encryption_bytes()
    token = context.key_id + hashlib.sha256(ctx_bytes).digest()[:8]
    pj = context.preset.to_json()
    per = -(-len(blocks) // workers)
    groups = [blocks[i:i + per] for i in range(0, len(blocks), per)]
    with _SCRATCH_LOCK:  # one update at a time uses the scratch files
        jobs = []
        in_paths: list[str] = []
        try:
            try:  # workers - 1 processes take all groups but the first ...
                pool = _get_pool(workers - 1)
                for i, group in enumerate(groups[1:]):
                    in_path, out_path = scratch_path(f"in-{i}"), scratch_path(f"out-{i}")
                    in_paths.append(in_path)
                    _write_plaintext_block(in_path, group)
                    jobs.append((pool.submit(_worker_encrypt, token, ctx_bytes, pj, in_path, group[0].dtype.str,
                                             [len(b) for b in group], out_path), out_path))
            except Exception as e:
                _remove_all(in_paths)
                return _pool_failed(e, local, blocks)
            out = _wire_chunks([_encrypt_one(*local, b) for b in groups[0]])  # ... this process encrypts meanwhile
            try:
                for future, out_path in jobs:
                    future.result()
                    with open(out_path, "rb") as f:
                        out.append(f.read())
                return out
            except Exception as e:  # a worker died, or could not start (e.g. a __main__ read from stdin)
                _remove_all(in_paths)  # a worker that died (or never ran) left its block unread
                return _pool_failed(e, local, blocks)
        finally:
            _remove_all(in_paths)


def _pool_failed(e: Exception, local: tuple[ts.Context, HEPreset], blocks: list[np.ndarray]) -> list[bytes]:
    global _POOL_BROKEN
    if isinstance(e, HEError):
        raise e
    _POOL_BROKEN = True
    shutdown_workers()
    remove_stale_scratch()  # a worker killed mid-way leaves its folder
    warnings.warn(f"fedgov.crypto: encryption worker processes failed ({type(e).__name__}: {e}); "
                  f"encrypting in this process from now on", RuntimeWarning, stacklevel=4)
    return _wire_chunks([_encrypt_one(*local, b) for b in blocks])
