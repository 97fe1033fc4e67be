"""The party that can decrypt: it releases sums of at least two updates, once per round.

Used by the custodian node (``secure.key_holder = "custodian"``) and by the cooperative that
the aggregator asks to decrypt (``"clients"``). Its ledger of decrypted rounds lives in the
key holder's own ``context.state``; the aggregator only ever sees what it releases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["DecryptRefused", "KeyHolder"]


class DecryptRefused(PermissionError):
    """The key holder will not decrypt this: one line saying why."""


class KeyHolder:
    """Decrypts aggregates under its own rules; ``keys`` is a secret context (``SecretKeys``)."""

    def __init__(self, keys: Any, check_key: Any, *, decrypted_rounds: Iterable[int] = ()) -> None:
        self._keys = keys
        self._check_key = check_key
        self.decrypted_rounds: set[int] = set(decrypted_rounds)

    def decrypt(self, aggregate: Any, *, server_round: int, contributors: Sequence[int]) -> list[np.ndarray]:
        """The decrypted sum, or DecryptRefused: a second request for one round, fewer than 2 distinct
        contributors, or check slots that are not those of the whole sum of ``contributors``' updates."""
        from .he import HEError, SumClaim, decrypt_aggregate

        if server_round in self.decrypted_rounds:
            raise DecryptRefused(f"round {server_round} was already decrypted once; a second sum of the same "
                                 f"round could reveal individual updates")
        claimed = [int(c) for c in contributors]
        if len(set(claimed)) != len(claimed) or len(claimed) < 2:
            raise DecryptRefused(f"refusing to decrypt: {claimed} is not a set of at least 2 distinct cooperatives")
        self.decrypted_rounds.add(server_round)  # asked once: even a refused forgery spends the round
        try:
            return decrypt_aggregate(aggregate, keys=self._keys,
                                     claim=SumClaim(self._check_key, server_round, tuple(claimed)))
        except HEError as exc:
            raise DecryptRefused(f"refusing to decrypt: {exc}") from None
