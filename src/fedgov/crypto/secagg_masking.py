"""SecAgg+'s masking arithmetic alone, with Flower's own primitives, for the benchmarks
(``fedgov.bench``'s aggregation suite): what one round costs a client and the server without
the messages. The protocol a run uses is ``fedgov.crypto.secagg``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

__all__ = ["MaskingCohort"]


class MaskingCohort:
    """SecAgg+'s per-round arithmetic for ``num_clients`` clients, with Flower's own primitives.

    What ``secaggplus_mod`` does to one update in stage 3 (weight, quantize, add the
    private mask and one pairwise mask per neighbour from an ECDH key, reduce modulo
    ``modulus_range``) and what ``SecAggPlusWorkflow`` does in stage 4 without dropouts
    (sum the masked vectors, rebuild each client's private-mask seed from
    ``threshold`` Shamir shares, subtract the masks, dequantize). Key generation and
    share distribution (stages 1-2) happen in ``__init__`` and are timed separately
    as ``setup_seconds``: they do not depend on the model size. Neighbours are the
    ``num_shares - 1`` next clients on a ring, as in SecAgg+'s k-regular graph.
    """

    def __init__(self, num_clients: int, *, num_shares: int = 3, threshold: int = 2, clip_range: float = 8.0,
                 quantization_range: int = 4194304, modulus_range: int = 2**32, seed: int = 0) -> None:
        import os as _os

        from flwr.common.secure_aggregation.crypto.shamir import create_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
        from flwr.supercore.primitives.asymmetric import (
            generate_key_pairs,
            private_key_to_bytes,
            public_key_to_bytes,
        )

        if num_clients < 2:
            raise ValueError("SecAgg+ needs at least 2 clients")
        self.num_clients = num_clients
        self.num_shares = min(num_shares, num_clients)
        self.threshold = min(threshold, self.num_shares)
        self.clip_range, self.quantization_range, self.modulus_range = clip_range, quantization_range, modulus_range
        started = time.perf_counter()
        pairs = [generate_key_pairs() for _ in range(num_clients)]
        self.seeds = [_os.urandom(32) for _ in range(num_clients)]
        # Shares of each seed, as the neighbours would hold them (stage 2's payload).
        self.seed_shares = [create_shares(s, self.threshold, self.num_shares) for s in self.seeds]
        k = self.num_shares - 1
        self.neighbours = [[(i + d) % num_clients for d in range(-(k // 2), k - k // 2 + 1) if d != 0][:k]
                           for i in range(num_clients)]
        self.shared_keys = [{j: generate_shared_key(pairs[i][0], pairs[j][1]) for j in self.neighbours[i]}
                            for i in range(num_clients)]
        self.setup_seconds = (time.perf_counter() - started) / num_clients
        public_key_bytes = len(public_key_to_bytes(pairs[0][1]))
        share_bytes = len(self.seed_shares[0][0]) + len(private_key_to_bytes(pairs[0][0]))
        # Stage 1-2 bytes per client: two public keys up, neighbours' keys down, encrypted shares both ways
        # (Fernet adds ~73 bytes to each share pair).
        self.setup_bytes = 2 * public_key_bytes * (1 + k) + 2 * k * (share_bytes + 73)

    def mask(self, index: int, arrays: Sequence[np.ndarray], *, weight: float = 1.0) -> list[np.ndarray]:
        """Client ``index``'s masked, quantized upload (the int64 arrays it sends)."""
        from flwr.common.secure_aggregation.ndarrays_arithmetic import (
            factor_combine,
            parameters_addition,
            parameters_mod,
            parameters_multiply,
            parameters_subtraction,
        )
        from flwr.common.secure_aggregation.quantization import quantize
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

        q_ratio = round(weight * self.quantization_range)
        params = parameters_multiply(list(arrays), q_ratio / self.quantization_range)
        quantized = factor_combine(q_ratio, quantize(params, self.clip_range, self.quantization_range))
        dims = [a.shape for a in quantized]
        quantized = parameters_addition(quantized, pseudo_rand_gen(self.seeds[index], self.modulus_range, dims))
        for j, key in self.shared_keys[index].items():
            mask = pseudo_rand_gen(key, self.modulus_range, dims)
            # Flower orders the pair by node id so the two masks cancel in the sum
            op = parameters_addition if index > j else parameters_subtraction
            quantized = op(quantized, mask)
        return parameters_mod(quantized, self.modulus_range)

    def unmask(self, masked: Sequence[Sequence[np.ndarray]], indices: Sequence[int]) -> list[np.ndarray]:
        """The server's stage 4: the weighted average of the clients ``indices`` (no dropouts), as Flower does."""
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares
        from flwr.common.secure_aggregation.ndarrays_arithmetic import (
            factor_extract,
            parameters_addition,
            parameters_mod,
            parameters_subtraction,
        )
        from flwr.common.secure_aggregation.quantization import dequantize
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

        total = list(masked[0])
        for vec in masked[1:]:
            total = parameters_addition(total, list(vec))
        dims = [a.shape for a in total]
        for i in indices:
            seed = combine_shares(self.seed_shares[i][: self.threshold])
            total = parameters_subtraction(total, pseudo_rand_gen(seed, self.modulus_range, dims))
        total = parameters_mod(total, self.modulus_range)
        # Pairwise masks cancel because every neighbour's mask is in the sum (no dropouts).
        q_total, summed = factor_extract(total)
        average = dequantize(summed, self.clip_range, self.quantization_range)
        offset = -(len(indices) - 1) * self.clip_range  # dequantize shifts by -c once; the sum holds k shifts
        return [(a + offset) * (self.quantization_range / q_total) for a in average]
