"""The engine-free floor: a federation's rounds run by fedgov's own code in one process, without Flower.

Every round does what a plain Flower round does, with the same functions and seeds:
the seeded cohort (``fedgov.sampling``), each sampled cooperative's local training
(``fedgov.task.train``, the ClientApp's batch order), the governance policy's weighted
mean of the updates, every cooperative's evaluation on its local test split, and the
global evaluation. There is no messaging, no serialization and no worker pool: the
cooperatives train one after another on one thread. What a Flower round costs beyond
this is the engine's; what a mechanism's round costs beyond a plain Flower round is the
mechanism's (``fedgov.bench``'s ``round`` suite reports both).

Only the plain mechanism has a floor: FedAvg with no DP, no secure aggregation, no attack,
no clipping and no similarity defense (``floor_problem`` says which setting is in the way).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .config import Config
from .governance.weighting import policy_weights
from .models import build_model
from .preflight import resolve_federation
from .sampling import cohort_sampler, evaluates_cooperatives, evaluation_interval, training_seed
from .task import evaluate, make_loader, pooled_loss, resolve_device, train

__all__ = ["FloorError", "floor_problem", "run_floor"]


class FloorError(ValueError):
    """The run has no engine-free floor (a mechanism or strategy the floor does not reproduce)."""


def floor_problem(cfg: Config) -> str | None:
    """Why ``cfg``'s rounds have no floor (None when they do)."""
    if cfg.strategy.name != "fedavg":
        return f"strategy.name = {cfg.strategy.name!r}: the floor reproduces FedAvg only"
    if cfg.privacy.dp != "off" or cfg.secure.aggregation != "off":
        return "the floor is the plain round: set privacy.dp = 'off' and secure.aggregation = 'off'"
    if cfg.attack.kind != "off" or cfg.heterogeneity.compute != "off" or cfg.heterogeneity.deadline > 0:
        return "the floor runs honest, equally fast cooperatives: set attack.kind and heterogeneity off"
    if cfg.governance.clip_update_norm > 0 or cfg.governance.similarity_defense:
        return ("the floor neither clips nor down-weights updates: set governance.clip_update_norm = 0 and "
                "governance.similarity_defense = false")
    if cfg.heterogeneity.stragglers > 0:
        return "the floor's cooperatives finish their local epochs: set heterogeneity.stragglers = 0"
    if cfg.governance.weighting == "stake" or cfg.governance.registrar_catch > 0:
        return ("the floor weights every identity by its size: set governance.weighting to a size policy and "
                "governance.registrar_catch = 0")
    return None


def run_floor(cfg: Config, *, rounds: int | None = None,
              on_round: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run ``rounds`` (default ``train.rounds``) floor rounds; one row per round.

    Each row has ``round``, ``seconds`` (the whole round), ``accuracy`` and ``loss`` (global
    test set), ``train_loss`` (the global model's loss over every member's training data, as
    the members report it; None in rounds without their evaluations) and ``phase_seconds``:
    ``train`` (all local training, one cooperative after another), ``local_train_max`` (the
    slowest cooperative's), ``aggregate``, ``evaluate`` (every cooperative's local evaluation,
    in the rounds ``train.evaluate_every`` picks) and ``global_evaluate``.
    """
    problem = floor_problem(cfg)
    if problem:
        raise FloorError(problem)
    cfg, federation = resolve_federation(cfg, given=frozenset())
    device = resolve_device(cfg.runtime.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every simulated cooperative does
    try:
        return _rounds(cfg, federation, device, cfg.train.rounds if rounds is None else rounds, on_round)
    finally:
        torch.set_num_threads(threads)


def _rounds(cfg: Config, federation: Any, device: torch.device, rounds: int,
            on_round: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    def new_model() -> torch.nn.Module:
        return build_model(cfg.model.name, input_shape=federation.input_shape, num_classes=federation.num_classes,
                           hidden=cfg.model.hidden, seed=cfg.seed)

    server_model, client_model = new_model(), new_model()
    global_state = {k: v.detach().clone() for k, v in server_model.state_dict().items()}
    coops = federation.cooperatives
    sampler = cohort_sampler(cfg, {c: len(coop.train) for c, coop in enumerate(coops)})
    every = evaluation_interval(cfg.train.evaluate_every, len(coops))
    rows: list[dict[str, Any]] = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        sampled = sampler.sample(server_round, range(len(coops)))
        updates: list[list[np.ndarray]] = []
        local_seconds: list[float] = []
        for c in sampled:
            t0 = time.perf_counter()
            client_model.load_state_dict(global_state)
            loader = make_loader(coops[c].train.x, coops[c].train.y, batch_size=cfg.train.batch_size, shuffle=True,
                                 seed=training_seed(cfg.seed, server_round, c))
            train(client_model, loader, epochs=cfg.train.local_epochs, lr=cfg.train.lr,
                  momentum=cfg.train.momentum, device=device)
            updates.append([t.detach().cpu().numpy().copy() for t in client_model.state_dict().values()])
            local_seconds.append(time.perf_counter() - t0)
        train_done = time.perf_counter()

        weights = policy_weights(cfg.governance.weighting, [len(coops[c].train) for c in sampled],
                                 cap=cfg.governance.cap)
        averaged = [sum(w * u[i] for w, u in zip(weights, updates)) for i in range(len(updates[0]))]
        global_state = {name: torch.from_numpy(np.asarray(a, dtype=np.float32))
                        for name, a in zip(global_state, averaged)}
        server_model.load_state_dict(global_state)
        aggregate_done = time.perf_counter()

        train_losses: list[tuple[float, int]] = []
        if evaluates_cooperatives(server_round, every=every, last_round=cfg.train.rounds):
            for coop in coops:  # what every member's ClientApp does when asked to evaluate
                client_model.load_state_dict(global_state)
                evaluate(client_model, coop.test.x, coop.test.y, device=device)
                on_train = evaluate(client_model, coop.train.x, coop.train.y, device=device)  # the papers' training loss
                train_losses.append((on_train.loss, on_train.num_examples))
        evaluate_done = time.perf_counter()

        result = evaluate(server_model, federation.global_test.x, federation.global_test.y, device=device)
        finished = time.perf_counter()
        row = {"round": server_round, "seconds": finished - started, "accuracy": result.accuracy,
               "loss": result.loss, "sampled": sampled,
               "train_loss": pooled_loss(train_losses),
               "phase_seconds": {"train": train_done - started, "local_train_max": max(local_seconds, default=0.0),
                                 "aggregate": aggregate_done - train_done, "evaluate": evaluate_done - aggregate_done,
                                 "global_evaluate": finished - evaluate_done}}
        rows.append(row)
        if on_round is not None:
            on_round(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m fedgov.floor``: the floor of a config's rounds; prints one line, writes the rows as JSON."""
    from pathlib import Path

    from .cli import ArgumentParser, fail
    from .config import ConfigError, read_config
    from .preflight import PreflightError, preflight
    from .results import write_json

    prog = "fedgov.floor"
    p = ArgumentParser(prog=prog, description="Run a config's rounds with fedgov's own code in one process, "
                                              "without Flower: the engine-free floor of the same federation.")
    p.add_argument("--config", type=Path, default=None, help="TOML config (default: configs/default.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    started = time.perf_counter()
    try:
        cfg, given = read_config(args.config, args.overrides)
        cfg, _ = preflight(cfg, given=given)
        problem = floor_problem(cfg)
        if problem:
            raise FloorError(problem)
    except (ConfigError, PreflightError, FloorError) as exc:
        fail(prog, str(exc), 2)
    rows = run_floor(cfg)
    seconds = time.perf_counter() - started
    if args.out is not None:
        write_json(args.out, {"config_hash": cfg.hash(), "rows": rows, "seconds": seconds})
    per_round = sum(r["seconds"] for r in rows) / len(rows)
    print(f"{prog}: {len(rows)} rounds of {cfg.data.num_cooperatives} cooperatives in {seconds:.1f} s "
          f"({per_round:.3f} s per round), final accuracy {rows[-1]['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
