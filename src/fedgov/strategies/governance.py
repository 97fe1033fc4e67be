"""A strategy wrapper for plaintext rounds: validate, weight, clip, digest and retain updates.

Between the replies and the wrapped Flower strategy (FedAvg, Krum, median, ...):

1. **Malformed updates are rejected**, not aggregated: missing or extra arrays, wrong
   shapes, NaN or Inf, or a change to the global model whose L2 norm exceeds
   ``governance.max_update_norm``. Each rejection is recorded with its reason and the
   round goes on with the rest.
2. **Weights follow the governance policy** (``fedgov.governance.electorate``): the
   aggregator computes them from each cooperative's *claimed* size (or stake), with the
   identities a registrar merged counted as one member, and writes them into the reply
   under ``WEIGHT_KEY``, which the inner strategy weights by.
3. **Optional defenses**: each update's change is clipped to ``governance.clip_update_norm``;
   with ``governance.similarity_defense`` (against sybils, FoolsGold-style) each weight is
   scaled by 1 minus the update's highest cosine similarity to another update of the round.
4. **Accountability**: the digest of every accepted update (as received, before clipping)
   goes to the audit log, and the update itself to the run's archive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..arrays import to_numpy
from ..audit import digest_arrays
from ..governance.archive import UpdateArchive
from ..governance.electorate import Electorate

__all__ = ["GovernedAggregation", "WEIGHT_KEY", "check_update"]

WEIGHT_KEY = "fedgov-weight"


def check_update(arrays: ArrayRecord, reference: dict[str, np.ndarray], *, max_norm: float) -> str | None:
    """Why an update cannot be aggregated (None if it can)."""
    return _read_update(arrays, reference, max_norm=max_norm)[1]


def _read_update(arrays: ArrayRecord, reference: dict[str, np.ndarray], *, max_norm: float
                 ) -> tuple[list[np.ndarray], str | None]:
    """The update's arrays (read once, read-only) and why it cannot be aggregated (None if it can)."""
    if list(arrays.keys()) != list(reference):
        missing = sorted(set(reference) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference))
        return [], f"wrong arrays (missing {missing}, unexpected {extra})"
    squared = 0.0
    values = []
    for name, ref in reference.items():
        try:
            value = to_numpy(arrays[name])
        except Exception as exc:  # noqa: BLE001 - any decoding failure makes the update malformed
            return [], f"array {name!r} cannot be read ({exc})"
        if value.shape != ref.shape:
            return [], f"array {name!r} has shape {list(value.shape)}, expected {list(ref.shape)}"
        if not np.issubdtype(value.dtype, np.number):
            return [], f"array {name!r} is not numeric ({value.dtype})"
        if not np.all(np.isfinite(value)):
            return [], f"array {name!r} holds NaN or Inf"
        squared += float(np.sum((value.astype(np.float64) - ref) ** 2))
        values.append(value)
    norm = squared ** 0.5
    if max_norm > 0 and norm > max_norm:
        return [], f"update norm {norm:.3g} exceeds governance.max_update_norm = {max_norm:g}"
    return values, None


class GovernedAggregation(Strategy):
    def __init__(self, inner: Strategy, *, electorate: Electorate, max_update_norm: float,
                 clip_update_norm: float, node_to_cooperative: dict[int, int],
                 archive: UpdateArchive | None, set_weights: bool, similarity_defense: bool = False) -> None:
        self.inner = inner
        self.similarity_defense = similarity_defense
        self.electorate = electorate
        self.max_update_norm = max_update_norm
        self.clip_update_norm = clip_update_norm
        self.node_to_cooperative = dict(node_to_cooperative)
        self.archive = archive
        # False under central DP, whose noise is calibrated to the unweighted mean it computes itself.
        self.set_weights = set_weights
        self._reference: dict[str, np.ndarray] = {}
        self.last: dict[str, Any] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._reference = {k: to_numpy(a).astype(np.float64) for k, a in arrays.items()}
        if self.archive is not None:
            self.archive.save_npy(server_round, "global", [a.data for a in arrays.values()])
        return self.inner.configure_train(server_round, arrays, config, grid)

    def _clip(self, reply: Message) -> bool:
        arrays = reply.content["arrays"]
        delta = {k: to_numpy(arrays[k]).astype(np.float64) - ref for k, ref in self._reference.items()}
        norm = float(np.sqrt(sum(np.sum(d ** 2) for d in delta.values())))
        if norm <= self.clip_update_norm:
            return False
        scale = self.clip_update_norm / norm
        reply.content["arrays"] = ArrayRecord({
            k: Array((self._reference[k] + scale * d).astype(to_numpy(arrays[k]).dtype)) for k, d in delta.items()})
        return True

    def _down_weight_similar(self, accepted: list[Message], weights: dict[int, float]
                             ) -> tuple[dict[int, float], dict[int, float]]:
        """FoolsGold-style: weight x (1 - highest cosine similarity to another update), rescaled so the
        least similar update keeps its full weight; returns the new weights and each one's similarity."""
        coops = [self.node_to_cooperative.get(r.metadata.src_node_id, -1) for r in accepted]
        deltas = np.stack([np.concatenate([(to_numpy(r.content["arrays"][k]).astype(np.float64) - ref).ravel()
                                           for k, ref in self._reference.items()]) for r in accepted])
        norms = np.linalg.norm(deltas, axis=1)
        unit = deltas / np.where(norms > 0, norms, 1.0)[:, None]
        cosine = unit @ unit.T
        np.fill_diagonal(cosine, -np.inf)
        highest = np.clip(cosine.max(axis=1), 0.0, 1.0)
        keep = 1.0 - highest
        keep = keep / keep.max() if keep.max() > 0 else np.ones_like(keep)  # all identical: no one to favour
        scaled = {c: weights[c] * float(m) for c, m in zip(coops, keep)}
        total = sum(scaled.values())
        if total <= 0:
            return weights, {c: float(h) for c, h in zip(coops, highest)}
        return {c: w / total for c, w in scaled.items()}, {c: float(h) for c, h in zip(coops, highest)}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[Message] = []
        rejected: list[dict[str, Any]] = []
        digests: dict[int, str] = {}
        claimed: dict[int, float] = {}
        clipped: list[int] = []
        for reply in replies:
            if reply.has_error():  # the recorder notes it; the inner strategy skips it
                continue
            coop = self.node_to_cooperative.get(reply.metadata.src_node_id, -1)
            arrays = reply.content.get("arrays")
            values, reason = (([], "no model arrays in the reply") if not isinstance(arrays, ArrayRecord)
                              else _read_update(arrays, self._reference, max_norm=self.max_update_norm))
            metrics = reply.content.get("metrics", {})
            size = metrics.get("num-examples") if reason is None else None
            if reason is None and not (isinstance(size, (int, float)) and np.isfinite(size) and size > 0):
                reason = f"claimed data size {size!r} is not a positive number"
            if reason is not None:
                rejected.append({"cooperative": coop, "reason": f"rejected update: {reason}", "rejected": True})
                continue
            digests[coop] = digest_arrays(values)
            if self.archive is not None:
                self.archive.save_npy(server_round, f"coop_{coop:03d}", [a.data for a in arrays.values()])
            claimed[coop] = float(size)
            if self.clip_update_norm > 0 and self._clip(reply):
                clipped.append(coop)
            accepted.append(reply)
        weights = (self.electorate.weights(claimed) if self.set_weights
                   else Electorate("equal").weights(claimed))
        similarity: dict[int, float] = {}
        if self.similarity_defense and len(accepted) > 1:
            weights, similarity = self._down_weight_similar(accepted, weights)
        if self.set_weights:
            for reply in accepted:
                coop = self.node_to_cooperative.get(reply.metadata.src_node_id, -1)
                reply.content["metrics"][WEIGHT_KEY] = weights[coop]
        self.last = {"rejected": rejected, "digests": digests, "weights": weights, "clipped": clipped,
                     "similarity": similarity}
        if not accepted:
            return None, None
        return self.inner.aggregate_train(server_round, accepted)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
