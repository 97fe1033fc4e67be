"""``secagg+``: Flower's SecAgg+ (on its legacy stack, behind ``fedgov.crypto.secagg``).

Client half (:func:`secagg_mod`): answers the four SecAgg+ stages with Flower's
``secaggplus_mod``; in the masking stage the honest ClientApp trains, reached through
``call_next`` with an ordinary train message. Server half: Flower's ``SecAggPlusWorkflow``
drives its own rounds (``run_rounds``), measured stage by stage.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from . import Mechanism, register

__all__ = ["SecAggPlus", "secagg_mod", "Declined"]


class Declined(RuntimeError):
    """The cooperative sat the round out by rule (a missed deadline, a spent budget)."""


def secagg_mod(config: Any) -> Any:
    """The SecAgg+ client half as a Flower mod (``config`` None: read from each message's run config)."""
    from ..client_errors import CODE_DECLINED
    from ..config import Config
    from ..crypto.secagg import is_secagg_message, secagg_train
    from ..data import build_federation

    def mod(message: Message, context: Context, call_next: Any) -> Message:
        if not is_secagg_message(message):
            return call_next(message, context)
        cfg = config if config is not None else Config.from_flat(context.run_config)
        federation = build_federation(cfg.data, seed=cfg.seed)
        names = _parameter_names(cfg.model.name, federation.input_shape, federation.num_classes, cfg.model.hidden)

        def fit(arrays: list, round_config: dict[str, Any]) -> tuple[list, int, dict[str, float]]:
            import torch

            if len(arrays) != len(names):
                raise ValueError(f"received {len(arrays)} arrays for a model with {len(names)}")
            state = ArrayRecord({n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays)})
            train = copy.copy(message)  # the stage's own metadata (a TRAIN message), with ordinary content
            train.content = RecordDict({"arrays": state, "config": ConfigRecord(round_config)})
            reply = call_next(train, context)
            if reply.has_error():
                raise (Declined if reply.error.code == CODE_DECLINED else RuntimeError)(reply.error.reason)
            metrics = dict(reply.content["metrics"])
            trained = [a.numpy() for a in reply.content["arrays"].values()]
            return trained, int(metrics["num-examples"]), metrics

        return secagg_train(message, context, fit=fit, declined={Declined: CODE_DECLINED}, verify=cfg.secure.verify)

    return mod


@functools.lru_cache(maxsize=8)
def _parameter_names(model: str, input_shape: tuple[int, ...], num_classes: int, hidden: int) -> list[str]:
    """The model's state_dict keys, in order (the legacy stack carries arrays without names)."""
    from ..models import build_model

    return list(build_model(model, input_shape=input_shape, num_classes=num_classes, hidden=hidden).state_dict())


def _run_rounds(*args: Any, **kwargs: Any) -> Any:
    from ..crypto.secagg import run_secagg_rounds

    return run_secagg_rounds(*args, **kwargs)


@register
class SecAggPlus(Mechanism):
    name = "secagg+"
    run_rounds = staticmethod(_run_rounds)

    @classmethod
    def applies(cls, cfg: Any) -> bool:
        return cfg.secure.aggregation == "secagg+"

    def client_mods(self) -> list[Any]:
        return [secagg_mod(self.cfg)]

    def summary(self, rows: list[dict[str, Any]], *, num_parameters: int) -> dict[str, Any]:
        from ..crypto.secagg import summary_block

        block = summary_block(self.cfg, rows, num_parameters=num_parameters)
        if self.cfg.secure.verify:
            block["reveals_updates"] = True
        return {"secure_aggregation": block}

    def audit_fields(self) -> dict[str, Any]:
        return {"reveals_updates": bool(self.cfg.secure.verify)}
