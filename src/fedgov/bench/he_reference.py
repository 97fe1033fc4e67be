"""Reference and baseline helpers of the HE benchmarks (and tests): what fedgov's HE is measured against.

* :func:`plaintext_fedavg`: the float64 weighted average HE must match;
* :func:`max_abs_error`: how far apart two updates are;
* :func:`tenseal_direct_sum`: the same sum as :func:`fedgov.crypto.aggregate`, done
  directly with TenSEAL's public API and no fedgov checks (the aggregation suite's baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..crypto import PublicContext, SecretKeys

__all__ = ["max_abs_error", "plaintext_fedavg", "tenseal_direct_sum"]


def plaintext_fedavg(arrays_per_client: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """sum_k w_k x_k / sum_k w_k per layer, in float64: the reference HE must match."""
    if len(arrays_per_client) != len(weights) or len(weights) == 0:
        raise ValueError("need one weight per client, and at least one client")
    total = float(sum(weights))
    out = [np.zeros(np.shape(a), dtype=np.float64) for a in arrays_per_client[0]]
    for arrays, w in zip(arrays_per_client, weights):
        for o, a in zip(out, arrays):
            o += float(w) * np.asarray(a, dtype=np.float64)
    return [o / total for o in out]


def max_abs_error(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest |a - b| over all layers (0 for empty updates)."""
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
                for x, y in zip(a, b, strict=True)), default=0.0)


def tenseal_direct_sum(chunks_per_update: Sequence[Sequence[bytes]], *, context: PublicContext | SecretKeys
                       ) -> list[bytes]:
    """The same sum done directly with TenSEAL's public API, no fedgov checks: a benchmark baseline.

    ``chunks_per_update``: each update's serialized ciphertexts
    (``EncryptedUpdate.chunk_bytes()``). Returns the summed ciphertexts, serialized.
    """
    import tenseal as ts

    p, ctx = context.preset, context.tenseal_context
    load = ts.ckks_vector_from if p.scheme == "ckks" else ts.bfv_vector_from
    acc = [load(ctx, c) for c in chunks_per_update[0]]
    for chunks in chunks_per_update[1:]:
        for j, c in enumerate(chunks):
            acc[j] += load(ctx, c)
    return [v.serialize() for v in acc]
