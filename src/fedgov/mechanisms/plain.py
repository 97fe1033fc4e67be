"""``plain``: no protection of updates; the aggregator sees them, validates, weights and clips them.

Server half: ``fedgov.strategies.governance.GovernedAggregation`` around the Flower strategy
(rejects malformed updates, applies the governance weights, optional clipping, digests).
"""

from __future__ import annotations

from typing import Any

from . import Mechanism, ServerSide, register

__all__ = ["Plain", "note_governance"]


def note_governance(log: Any, measured: dict[str, Any]) -> None:
    """Put what a governance wrapper saw into the round log (rejections, weights, digests)."""
    log.failures.extend(measured.get("rejected", []))
    log.weights = dict(measured.get("weights", {}))
    log.update_digests = dict(measured.get("digests", {}))
    if measured.get("clipped"):
        log.extra["clipped_updates"] = list(measured["clipped"])
    if measured.get("similarity"):  # governance.similarity_defense: each update's highest cosine to another
        log.extra["update_similarity"] = {str(c): v for c, v in sorted(measured["similarity"].items())}


@register
class Plain(Mechanism):
    name = "plain"

    @classmethod
    def applies(cls, cfg: Any) -> bool:
        return cfg.secure.aggregation == "off"

    def wrap_strategy(self, strategy: Any, side: ServerSide) -> Any:
        from ..strategies import govern

        return govern(strategy, self.cfg, node_to_cooperative=side.node_to_cooperative, archive=side.archive,
                      electorate=side.electorate)

    def note_round(self, log: Any, strategy: Any) -> None:
        note_governance(log, strategy.last)
