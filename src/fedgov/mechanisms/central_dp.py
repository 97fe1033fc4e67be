"""``central-dp`` (``privacy.dp = "user"``): cooperative-level DP with Flower's fixed-clipping pair.

Client half: Flower's ``fixedclipping_mod``, on train messages that carry a clipping norm
(``privacy.clipping_side = "client"``). Server half: Flower's
``DifferentialPrivacy{Server,Client}SideFixedClipping`` around the strategy, with the
accounting Flower lacks (``fedgov.privacy.central``: epsilon after every round).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from . import Mechanism, ServerSide, register

__all__ = ["CentralDP", "clip_when_asked"]


def clip_when_asked(message: Message, context: Context, call_next: Any) -> Message:
    """Flower's client-side clipping mod, only on train messages that carry a clipping norm
    (the bare mod would reject every other message)."""
    if message.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in message.content.get(
            "config", {}):
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


@register
class CentralDP(Mechanism):
    name = "central-dp"
    layer = 0

    @classmethod
    def applies(cls, cfg: Any) -> bool:
        return cfg.privacy.dp == "user"

    def client_mods(self) -> list[Any]:
        return [clip_when_asked]

    def wrap_strategy(self, strategy: Any, side: ServerSide) -> Any:
        from ..privacy.central import central_dp
        from ..strategies import cohort_size

        return central_dp(self.cfg, cohort_size=cohort_size(self.cfg)).wrap(strategy)

    def audit_fields(self) -> dict[str, Any]:
        return {"dp": "user"}
