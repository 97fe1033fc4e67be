"""fedgov's mechanisms: how updates are protected and combined, each in one place.

A mechanism is a pair, as Flower's own are (``fixedclipping_mod`` with
``DifferentialPrivacyClientSideFixedClipping``, ``secaggplus_mod`` with ``SecAggPlusWorkflow``):

- its **client half**: Flower mods around the honest ClientApp (:meth:`Mechanism.client_mods`);
- its **server half**: a wrapper around the Flower strategy (:meth:`~Mechanism.wrap_strategy`),
  what it copies into each round's log (:meth:`~Mechanism.note_round`) and, where it must
  see every message, a wrapper around the grid (:meth:`~Mechanism.wrap_grid`);
- its **record**: its blocks of ``summary.json`` (:meth:`~Mechanism.summary`) and its fields
  in every audit record (:meth:`~Mechanism.audit_fields`).

:func:`active` returns the mechanisms a config names from a string-keyed registry, inner
first: privacy (``dp-sgd``, ``central-dp``) wraps the Flower strategy before aggregation
(``plain``, ``he``, ``secagg+``) wraps the result. ``client_app.py`` and ``server_app.py``
only compose them. docs/mechanisms.md shows how to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Mechanism", "ServerSide", "MECHANISMS", "register", "active", "audit_fields", "mechanism_mods"]

Mod = Callable[..., Any]  # Flower's (message, context, call_next) -> Message


@dataclass
class ServerSide:
    """What a mechanism's server half is given: the run's config and what discovery found."""

    cfg: Config
    node_to_cooperative: dict[int, int]
    cooperatives: dict[int, dict[str, Any]]
    custodian_node: int | None = None
    archive: Any = None
    checkpoint: Any = None
    electorate: Any = None  # fedgov.governance.electorate.Electorate: who votes with what weight


class Mechanism:
    """One mechanism; every hook does nothing unless the mechanism has something to add."""

    name: ClassVar[str] = ""
    layer: ClassVar[int] = 1  # 0: privacy, wraps the Flower strategy first; 1: aggregation, outside it

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @classmethod
    def applies(cls, cfg: Config) -> bool:
        """Whether ``cfg`` asks for this mechanism."""
        raise NotImplementedError

    # -- client half ------------------------------------------------------------------
    def client_mods(self) -> list[Mod]:
        """Flower mods around the honest ClientApp, outermost first."""
        return []

    # -- server half ------------------------------------------------------------------
    def wrap_grid(self, grid: Any, side: ServerSide) -> Any:
        return grid

    def wrap_strategy(self, strategy: Any, side: ServerSide) -> Any:
        return strategy

    def note_round(self, log: Any, strategy: Any) -> None:
        """Copy what this mechanism's wrapper measured in the round into the round log."""

    run_rounds: ClassVar[Callable[..., Any] | None] = None  # a mechanism with a round loop of its own (SecAgg+)

    # -- record -----------------------------------------------------------------------
    def summary(self, rows: list[dict[str, Any]], *, num_parameters: int) -> dict[str, Any]:
        """Blocks of summary.json, e.g. ``{"secure_aggregation": {...}}``."""
        return {}

    def audit_fields(self) -> dict[str, Any]:
        """Fields of the ``mechanism`` entry of every audit record."""
        return {}


MECHANISMS: dict[str, type[Mechanism]] = {}


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Make a mechanism known by its name (``@register`` on the class), as Opacus registers accountants."""
    if not cls.name or cls.name in MECHANISMS:
        raise ValueError(f"mechanism name {cls.name!r} is empty or taken")
    MECHANISMS[cls.name] = cls
    return cls


def active(cfg: Config) -> list[Mechanism]:
    """The mechanisms ``cfg`` names, privacy first."""
    _load_builtin()
    return sorted((cls(cfg) for cls in MECHANISMS.values() if cls.applies(cfg)), key=lambda m: m.layer)


def audit_fields(cfg: Config) -> dict[str, Any]:
    """Every active mechanism's audit fields, merged."""
    fields: dict[str, Any] = {}
    for mechanism in active(cfg):
        fields.update(mechanism.audit_fields())
    return fields


_MODS: dict[str, tuple[Mod, ...]] = {}


def _mods_for(cfg: Config) -> tuple[Mod, ...]:
    """Aggregation mods first (outermost), then privacy; each mechanism's own in its order."""
    key = cfg.hash() + cfg.secure.key_dir  # the key folder is not part of the hash, but the HE mods read it
    if key not in _MODS:
        _MODS[key] = tuple(mod for m in sorted(active(cfg), key=lambda m: -m.layer) for mod in m.client_mods())
    return _MODS[key]


def mechanism_mods(config: Config | None) -> Mod:
    """One Flower mod that runs the client halves of the config's mechanisms around the honest app.

    Aggregation mods are outermost (they see the trained reply last: encrypt, mask), privacy
    mods inside them (clip). With ``config`` None (``flwr run``) the config is read from each
    message's run config, so one ClientApp serves any run.
    """
    from ..config import Config

    fixed = _mods_for(config) if config is not None else None  # a fixed config: its mods, found once

    def run(message: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        mods = fixed if fixed is not None else _mods_for(Config.from_flat(context.run_config))
        chain = call_next
        for mod in reversed(mods):
            chain = _bind(mod, chain)
        return chain(message, context)

    return run


def _bind(mod: Mod, call_next: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    return lambda message, context: mod(message, context, call_next)


def _load_builtin() -> None:
    # The built-in mechanisms register themselves on import (plain imports, no shim).
    from . import central_dp, dp_sgd, he, plain, secagg  # noqa: F401
