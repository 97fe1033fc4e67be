"""What is checked, and settled, before any engine starts.

The config validates itself (``fedgov.config``); what depends on the data, the machine or
files on disk is checked here, so that ``fedgov.simulate`` stops with exit status 2 and one
line before any engine or SuperLink starts. The ServerApp runs the same data step, so the
Flower-native path agrees with the simulation on the federation's size.
"""

from __future__ import annotations

from collections.abc import Set

from .config import Config, secagg_cohort_problem
from .data import DataError, Federation, build_federation

__all__ = ["PreflightError", "data_decides_size", "resolve_federation", "check_device", "check_keys", "preflight"]

COOPERATIVES_KEY = "data.num_cooperatives"


class PreflightError(ValueError):
    """A setting that cannot work on this data, machine or key folder (one line naming it)."""


def data_decides_size(cfg: Config) -> bool:
    """A natural partition of the user's CSV: one cooperative per distinct value of the column."""
    return cfg.data.partition == "natural" and cfg.data.dataset == "csv"


def resolve_federation(cfg: Config, *, given: Set[str] | None) -> tuple[Config, Federation]:
    """Build the federation and let the data fix ``data.num_cooperatives`` where it can.

    ``given`` holds the keys the user set explicitly; ``None`` means all of them (a resumed
    run's own config.toml). A count the user fixed that the data contradicts is an error.
    """
    federation = build_federation(cfg.data, seed=cfg.seed)
    count = federation.num_cooperatives
    if data_decides_size(cfg) and count != cfg.data.num_cooperatives:
        if given is None or COOPERATIVES_KEY in given:
            raise PreflightError(
                f"{COOPERATIVES_KEY}: set to {cfg.data.num_cooperatives}, but column "
                f"{cfg.data.cooperative_column!r} of {cfg.data.path} names {count} cooperatives; "
                f"leave {COOPERATIVES_KEY} unset or set it to {count}")
        cfg = cfg.replace(**{COOPERATIVES_KEY: count})
    _check_against_size(cfg, count)
    return cfg, federation


def _check_against_size(cfg: Config, count: int) -> None:
    """Settings the config could check only once the federation's size was known."""
    if count < 2:
        raise PreflightError(f"{COOPERATIVES_KEY}: the data defines {count} cooperative; a federation needs 2")
    if cfg.attack.cooperatives:
        from .attacks import AttackError, select_attackers

        try:
            select_attackers(count, fraction=cfg.attack.fraction, cooperatives=cfg.attack.cooperatives,
                             seed=cfg.seed)
        except AttackError as exc:
            raise PreflightError(str(exc)) from None
    if cfg.secure.aggregation == "secagg+":
        problem = secagg_cohort_problem(cfg.secure, cfg.strategy.cohort_size(count))
        if problem:
            raise PreflightError(problem)


def check_device(cfg: Config) -> None:
    """``cuda`` on a machine where PyTorch sees no GPU stops here, not inside the engine."""
    if cfg.runtime.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
        raise PreflightError(f"runtime.device: 'cuda', but PyTorch {torch.__version__} (built {build}) "
                             f"sees no GPU on this machine; use 'auto' or 'cpu'")


def check_ray_address(cfg: Config, *, timeout: float = 3.0) -> None:
    """A Ray cluster named by ``runtime.ray_address`` must answer now, not after Ray's long wait."""
    address = cfg.runtime.ray_address
    if address in ("", "auto"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PreflightError(f"runtime.ray_address: {address!r} is not HOST:PORT of a Ray head node (or 'auto')")
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PreflightError(f"runtime.ray_address: no Ray head answers at {address} ({exc.strerror or exc}); "
                             f"start one with `ray start --head`, or leave runtime.ray_address empty for a "
                             f"local Ray instance") from None


def check_keys(cfg: Config) -> None:
    """A user-provided HE key folder must hold keys made for this run's preset, key holder and board."""
    if cfg.secure.aggregation != "he" or not cfg.secure.key_dir:
        return
    from .crypto.keys import KeyDirError, check_key_dir

    try:
        check_key_dir(cfg.secure.key_dir, preset=cfg.secure.preset, key_holder=cfg.secure.key_holder,
                      board_size=cfg.governance.board_size, board_threshold=cfg.governance.board_threshold)
    except KeyDirError as exc:
        raise PreflightError(f"secure.key_dir: {exc}") from None


def preflight(cfg: Config, *, given: Set[str] | None) -> tuple[Config, Federation]:
    """Every check that can run before the engine starts; returns the settled config."""
    try:
        cfg, federation = resolve_federation(cfg, given=given)
    except DataError as exc:
        raise PreflightError(str(exc)) from None
    check_device(cfg)
    check_keys(cfg)
    check_ray_address(cfg)
    return cfg, federation
