"""Homomorphic-encryption aggregation as a strategy wrapper.

The wrapped Flower strategy (FedAvg or FedProx) still picks the messages; this
wrapper tells each cooperative its aggregation weight under the governance policy
(``governance.weighting``, from the sizes the cooperatives claimed), so that every
cooperative weights its own update *before* encrypting it, sums the ciphertexts
with a public context, and has a key holder decrypt only the sum:

- key holder ``clients``: one participating cooperative decrypts (a QUERY
  message), as NVIDIA FLARE's clients do;
- key holder ``custodian``: a separate oversight party, a node of its own
  (``fedgov.decryption``), decrypts.

Either way the key holder is reached through the grid: the aggregator's process never
opens a secret key (``self.context.is_private()`` is False). What it cannot check: the weights. A cooperative that claims a larger
``n_k`` simply gets more influence, and nobody sees it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..client_errors import clean_reason
from ..governance.electorate import Electorate

__all__ = ["HESecureAggregation"]


class HESecureAggregation(Strategy):
    def __init__(self, inner: Strategy, *, key_dir: Path, custodian_node: int | None, examples: dict[int, int],
                 node_to_cooperative: dict[int, int], verify: bool, electorate: Electorate | None = None,
                 archive: Any = None) -> None:
        from ..crypto import PublicContext
        from ..crypto.keys import AGGREGATOR_CONTEXT

        self.inner = inner
        self.context = PublicContext.from_bytes((key_dir / AGGREGATOR_CONTEXT).read_bytes())
        # The key holder is always another party, reached through the grid: the custodian's node, or
        # (key holder "clients") one of the round's contributors. This process opens no secret key.
        self.custodian_node = custodian_node
        self.examples = examples
        self.node_to_cooperative = node_to_cooperative
        self.verify = verify
        self.electorate = electorate or Electorate()
        self.archive = archive
        self._weights: dict[int, float] = {}
        self._grid: Grid | None = None
        self._current: list[np.ndarray] = []
        self._keys: list[str] = []
        self.last: dict[str, Any] = {}  # what the last round measured, for the round log

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._keys = list(arrays.keys())
        self._current = [a.numpy() for a in arrays.values()]
        if self.archive is not None:
            self.archive.save_arrays(server_round, "global", self._current)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        cohort = [self.node_to_cooperative[m.metadata.dst_node_id] for m in messages]
        self._weights = self.electorate.weights({c: self.examples[c] for c in cohort})
        for message in messages:  # Flower's strategies share one RecordDict among messages: give each its own
            weight = self._weights[self.node_to_cooperative[message.metadata.dst_node_id]]
            content = dict(message.content.items())
            content["config"] = ConfigRecord({**message.content["config"], "he-weight": weight})
            message.content = RecordDict(content)
        return messages

    def _decrypt(self, aggregate: Any, participants: list[Message], server_round: int
                 ) -> tuple[list[np.ndarray], float]:
        from ..decryption import decrypt_request

        started = time.perf_counter()
        assert self._grid is not None
        # Deterministic: replies are in cooperative order, so "clients" always asks the first contributor.
        holder = self.custodian_node if self.custodian_node is not None else participants[0].metadata.src_node_id
        contributors = [self.node_to_cooperative[r.metadata.src_node_id] for r in participants]
        request = decrypt_request(aggregate.to_numpy(), server_round=server_round, contributors=contributors,
                                  dst_node_id=holder)
        (reply,) = list(self._grid.send_and_receive([request], timeout=600))
        if reply.has_error():
            who = "the custodian" if self.custodian_node is not None else "the key-holding cooperative"
            raise RuntimeError(f"{who} did not decrypt the aggregate: {clean_reason(reply.error.reason)}")
        arrays = [a.numpy() for a in reply.content["arrays"].values()]
        return arrays, time.perf_counter() - started

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from ..audit import digest_bytes
        from ..crypto import EncryptedUpdate, HEError, aggregate, check_update

        accepted, updates, rejected, blobs = [], [], [], []
        shapes = [c.shape for c in self._current]

        def reject(reply: Message, reason: str) -> None:
            rejected.append({"cooperative": self.node_to_cooperative.get(reply.metadata.src_node_id, -1),
                             "reason": f"rejected HE update: {reason}", "rejected": True})

        for reply in replies:
            if reply.has_error():
                continue
            coop = self.node_to_cooperative.get(reply.metadata.src_node_id, -1)
            try:  # header checks only: cheap, and enough for most malformed updates
                blob = reply.content["he-update"]["ciphertext"].numpy()
                update = EncryptedUpdate.from_bytes(blob)
                check_update(update, context=self.context, shapes=shapes)
            except (HEError, KeyError, ValueError, TypeError) as exc:  # reject, record, go on
                reject(reply, str(exc))
                continue
            if update.contributors != 1 or abs(update.weight - self._weights.get(coop, -1.0)) > 1e-9:
                reject(reply, f"declares {update.contributors} contributor(s) of weight {update.weight:.6g}, "
                              f"but was assigned one of weight {self._weights.get(coop, 0.0):.6g}")
                continue
            updates.append(update)
            accepted.append(reply)
            blobs.append(np.ascontiguousarray(blob))  # a view: digested and archived as received, not copied
        started = time.perf_counter()
        summed = None
        if len(updates) >= 2:
            try:
                summed = aggregate(updates, context=self.context)
            except HEError:  # a ciphertext whose bytes are bad: find it, reject it, sum the rest
                keep = []
                for i, update in enumerate(updates):
                    try:
                        aggregate([update], context=self.context)
                        keep.append(i)
                    except HEError as exc:
                        reject(accepted[i], str(exc))
                updates, accepted, blobs = ([seq[i] for i in keep] for seq in (updates, accepted, blobs))
                if len(updates) >= 2:
                    summed = aggregate(updates, context=self.context)
        if summed is None:  # a key holder decrypts sums, never one update: keep the model this round
            self.last = {"rejected": rejected, "digests": {}, "weights": {},
                         "skipped": f"{len(updates)} valid update(s): no aggregate of at least 2 to decrypt"}
            return None, None
        seconds_aggregate = time.perf_counter() - started
        contributors = [self.node_to_cooperative.get(r.metadata.src_node_id, -1) for r in accepted]
        digests = {c: digest_bytes(memoryview(b)) for c, b in zip(contributors, blobs)}
        if self.archive is not None:
            for coop, data in zip(contributors, blobs):
                self.archive.save_bytes(server_round, f"coop_{coop:03d}", memoryview(data))
        self.last = {"rejected": rejected, "digests": digests,
                     "weights": {c: self._weights[c] for c in contributors if c in self._weights}}
        average_delta, seconds_decrypt = self._decrypt(summed, accepted, server_round)
        new = [(c + d).astype(c.dtype) for c, d in zip(self._current, average_delta)]
        num_params = sum(c.size for c in self._current)
        self.last.update({
            "seconds_he_aggregate": seconds_aggregate,
            "seconds_decrypt": seconds_decrypt,
            "bytes_per_param": float(np.mean([u.num_bytes for u in updates])) / num_params,
        })
        if self.verify:
            total = sum(float(r.content["metrics"]["he_weight"]) for r in accepted)
            plain = [sum(r.content["verify"][str(i)].numpy() for r in accepted) / total
                     for i in range(len(self._current))]
            self.last["max_abs_error"] = float(max(np.abs(p - d).max() for p, d in zip(plain, average_delta)))
        arrays = ArrayRecord({k: Array(a) for k, a in zip(self._keys, new)})
        return arrays, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
