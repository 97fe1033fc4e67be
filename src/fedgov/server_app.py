"""Flower ServerApp: reads the config, builds a strategy and calls ``strategy.start``.

The round loop is Flower's. fedgov adds a discovery query (which node holds which
cooperative, and which is the custodian), the server halves of the run's mechanisms
(``fedgov.mechanisms``: each wraps the grid and the strategy), a seeded cohort sampler and a
recorder around them (``fedgov.strategies.RoundRecorder``), one traffic meter for every
message (``fedgov.traffic``), a central evaluation on the server-held global test set, and
the run directory (``fedgov.run_record``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .audit import LOG_NAME, AuditError, AuditLog
from .client_errors import clean_reason
from .decryption import CUSTODIAN_ROLE, extra_nodes, uses_custodian
from .traffic import TrafficMeter
from .config import Config
from .preflight import resolve_federation
from .governance.archive import UpdateArchive
from .models import build_model, count_parameters
from .results import atomic_write_bytes, atomic_write_text, new_run_dir
from .run_record import Checkpoint, RunRecord, mechanism
from .mechanisms import ServerSide, active
from .sampling import cohort_sampler, evaluation_interval
from .strategies import RoundRecorder, build_strategy
from .task import evaluate, resolve_device

__all__ = ["app", "build_server_app", "run_federation", "FederationError"]

NODE_WAIT_SECONDS = 300.0
# Discovery sends one query per member at once; on Flower's in-memory engine each sweep costs
# members x messages in flight (~0.05 s per member at 10,000 members on 2 cores; the pool: ~0.3 ms).
DISCOVERY_SECONDS_PER_MEMBER = 0.1


class FederationError(RuntimeError):
    """The federation cannot run as configured (missing nodes, mismatched cooperatives)."""


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    last_report = 0.0
    while len(nodes := sorted(grid.get_node_ids())) != expected:
        if len(nodes) > expected:  # e.g. num-supernodes or SuperNodes started for another federation size
            raise FederationError(f"{len(nodes)} nodes joined, but the data defines {expected} cooperatives "
                                  f"(data.num_cooperatives = {expected}); run one node per cooperative")
        if time.monotonic() - last_report > 10:  # a silent wait looks like a hang (e.g. too few SuperNodes)
            log(INFO, "fedgov: %d of %d cooperatives connected; waiting", len(nodes), expected)
            last_report = time.monotonic()
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {expected} cooperatives connected within "
                                  f"{timeout:.0f} s (data.num_cooperatives = {expected}); start one SuperNode "
                                  f"per cooperative, or on a simulation SuperLink pass --federation-config "
                                  f"'num-supernodes={expected}'")
        time.sleep(0.5)
    return nodes


def discover_cooperatives(grid: Grid, node_ids: list[int], timeout: float, *, num_cooperatives: int,
                          expect_custodian: bool = False
                          ) -> tuple[dict[int, int], dict[int, dict[str, Any]], int | None]:
    """Ask every node which cooperative it is; node ids are random, cooperative ids are not.

    Returns node -> cooperative, each cooperative's statistics, and the custodian's node (if any).
    """
    query = RecordDict({"config": ConfigRecord({})})  # one content for all, as Flower's strategies send theirs
    messages = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=node) for node in node_ids]
    node_to_coop: dict[int, int] = {}
    stats: dict[int, dict[str, Any]] = {}
    custodians: list[int] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FederationError(f"node {node} could not load its cooperative: {clean_reason(reply.error.reason)}")
        if "cooperative" not in reply.content:  # a node with another role: the custodian
            custodians.append(node)
            continue
        record = reply.content["cooperative"]
        coop = int(record["partition-id"])
        if coop in stats:
            raise FederationError(f"two nodes claim cooperative {coop} (check each SuperNode's partition-id)")
        node_to_coop[node] = coop
        stats[coop] = {"id": coop, "name": str(reply.content["identity"]["name"]),
                       "num_examples": int(record["num-examples"]), "num_train": int(record["num-train"]),
                       "num_test": int(record["num-test"]),
                       "label_counts": [int(c) for c in record["label-counts"]]}
    missing = sorted(set(range(num_cooperatives)) - set(stats))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise FederationError(f"no reply from {len(missing)} of {num_cooperatives} cooperative(s) within "
                              f"{timeout:.0f} s ({shown})")
    if len(custodians) != (1 if expect_custodian else 0):
        raise FederationError(f"{len(custodians)} custodian node(s) joined; secure.key_holder = 'custodian' needs "
                              f"exactly one (a SuperNode with --node-config \"role=custodian\"), other runs none")
    return node_to_coop, stats, (custodians[0] if custodians else None)


def run_federation(grid: Grid, cfg: Config, run_dir: Path, *,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> RunRecord:
    """Train the federation for ``train.rounds`` rounds, resuming from ``run_dir``'s checkpoint if any."""
    wall_start = time.perf_counter()
    if hasattr(grid, "pull_interval"):  # the simulation's in-memory grid: poll often, so timings measure work
        grid.pull_interval = cfg.runtime.poll_interval
    # The data settles the federation's size here too, so `flwr run` agrees with fedgov.simulate.
    cfg, federation = resolve_federation(cfg, given=frozenset())
    device = resolve_device(cfg.runtime.device)
    torch.set_num_threads(1)

    startup = {"before_nodes": time.perf_counter() - wall_start}
    nodes = _wait_for_nodes(grid, federation.num_cooperatives + extra_nodes(cfg), NODE_WAIT_SECONDS)
    startup["wait_for_nodes"] = time.perf_counter() - wall_start - startup["before_nodes"]
    node_to_coop, coop_stats, custodian_node = discover_cooperatives(
        grid, nodes, timeout=NODE_WAIT_SECONDS + DISCOVERY_SECONDS_PER_MEMBER * len(nodes),
        num_cooperatives=federation.num_cooperatives,
        expect_custodian=uses_custodian(cfg))
    startup["discovery"] = time.perf_counter() - wall_start - startup["before_nodes"] - startup["wait_for_nodes"]
    parties: dict[int, int | str] = {**node_to_coop}
    if custodian_node is not None:
        parties[custodian_node] = CUSTODIAN_ROLE
    members = member_keys(grid, parties)

    model = build_model(cfg.model.name, input_shape=federation.input_shape,
                        num_classes=federation.num_classes, hidden=cfg.model.hidden, seed=cfg.seed)
    test = federation.global_test
    probe = _attack_probe(cfg, federation, model, device)
    # Every message of every round from here on passes one meter, so all mechanisms are counted alike.
    grid = meter = TrafficMeter(grid)
    checkpoint = Checkpoint.load(run_dir)
    if cfg.secure.aggregation == "he":
        _copy_escrow(Path(cfg.secure.key_dir), run_dir)
    electorate, electorate_audit = _electorate(cfg, federation)
    audit = open_audit(run_dir, cfg, cooperatives=coop_stats, resuming=checkpoint is not None,
                       electorate=electorate_audit, members=members)
    record = RunRecord(run_dir, cfg, cooperatives=coop_stats, num_parameters=count_parameters(model),
                       device=str(device), audit=audit, probe=probe, ground_truth=_ground_truth(cfg, federation),
                       registrar=electorate_audit.get("registrar"))
    record.startup_seconds = startup
    if checkpoint is not None:
        record.restore(checkpoint)
        initial_arrays = checkpoint.arrays
    else:
        initial_arrays = ArrayRecord(model.state_dict())
    done = record.rounds_done
    if done >= cfg.train.rounds:
        if not (run_dir / "summary.json").is_file():  # killed after its last checkpoint: finish the record now
            record.finish(wall_seconds=time.perf_counter() - wall_start, arrays=initial_arrays)
        return record

    # The run's mechanisms (fedgov.mechanisms), privacy first: each wraps the grid and the strategy.
    side = ServerSide(cfg=cfg, node_to_cooperative=node_to_coop, cooperatives=coop_stats,
                      custodian_node=custodian_node, checkpoint=checkpoint, electorate=electorate,
                      archive=UpdateArchive(run_dir) if cfg.governance.retain_updates else None)
    mechanisms = active(cfg)
    strategy = build_strategy(cfg)
    wrapped = []
    for m in mechanisms:
        grid = m.wrap_grid(grid, side)
        strategy = m.wrap_strategy(strategy, side)
        wrapped.append((m, strategy))
    recorder = RoundRecorder(strategy, node_to_cooperative=node_to_coop,
                             sampler=cohort_sampler(cfg, {c: s["num_train"] for c, s in coop_stats.items()}),
                             round_offset=done, meter=meter, last_round=cfg.train.rounds,
                             evaluate_every=evaluation_interval(cfg.train.evaluate_every, len(coop_stats)))
    latest = {"arrays": initial_arrays}

    def global_metrics(arrays: ArrayRecord) -> tuple[float, float]:
        """Accuracy and loss of a global model on the server-held global test set."""
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, test.x, test.y, device=device)
        return result.accuracy, result.loss

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracy, loss = global_metrics(arrays)
        if server_round > 0:  # Flower's round 0 is the starting model
            for m, wrapper in reversed(wrapped):
                m.note_round(recorder.current, wrapper)
            latest["arrays"] = arrays
            row = record.add_round(recorder.current, accuracy=accuracy, loss=loss, arrays=arrays)
            record.save_checkpoint(arrays)
            if on_round is not None:
                on_round(row)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    driver = next((m for m in mechanisms if m.run_rounds is not None), None)
    if driver is not None:  # SecAgg+ lives on Flower's legacy stack, with a round loop of its own
        latest["arrays"] = driver.run_rounds(grid, cfg, initial_arrays=initial_arrays, node_to_cooperative=node_to_coop,
                                             sampler=recorder.sampler, record=record, evaluate_fn=global_metrics,
                                             round_offset=done, on_round=on_round)
    else:
        recorder.start(grid, initial_arrays, num_rounds=cfg.train.rounds - done,
                       timeout=cfg.runtime.round_timeout, evaluate_fn=central_evaluate)
    record.finish(wall_seconds=time.perf_counter() - wall_start, arrays=latest["arrays"])
    return record


def _audit_key_path(run_dir: Path) -> Path:
    # The signing key must survive a crash to resume the log, but not sit in the run dir it signs.
    return run_dir.resolve().parent / ".audit-keys" / f"{run_dir.name}.ed25519"


def _electorate(cfg: Config, federation: Any) -> tuple[Any, dict[str, Any]]:
    """Who votes with what weight (stakes, the registrar's merges), and what the audit log says of it."""
    from .governance.electorate import electorate_for, registrar_record

    actors = [federation.actor_of(c) for c in range(federation.num_cooperatives)]
    sizes = [len(c.train) for c in federation.cooperatives]
    electorate = electorate_for(cfg.governance, actors, seed=cfg.seed, sizes=sizes)
    record: dict[str, Any] = {}
    registrar = registrar_record(cfg.governance, electorate, actors)
    if registrar is not None:
        record["registrar"] = registrar
    if electorate.stakes:
        record["stakes"] = {str(c): v for c, v in sorted(electorate.stakes.items())}
    return electorate, record


def member_keys(grid: Grid, parties: dict[int, int | str]) -> dict[int | str, dict[str, Any]]:
    """Each party's node and the fingerprint of the key its SuperNode joined with, by cooperative
    (``parties`` maps node -> cooperative, or -> ``"custodian"``).

    On the Deployment Engine with SuperNode authentication, that key is the one registered for
    the member (``fedgov.member_key``); simulated nodes have no key, and get no entry.
    """
    from .member_key import fingerprint_of_pem

    found: dict[int | str, dict[str, Any]] = {}
    for info in grid.get_nodes():
        if info.node_id in parties and (key := fingerprint_of_pem(info.public_key)) is not None:
            found[parties[info.node_id]] = {"node_id": int(info.node_id), "member_key": key}
    return found


def open_audit(run_dir: Path, cfg: Config, *, cooperatives: dict[int, dict[str, Any]], resuming: bool,
               electorate: dict[str, Any] | None = None,
               members: dict[int | str, dict[str, Any]] | None = None) -> AuditLog:
    """Start (or, on resume, continue) the run's signed audit log.

    ``members``: each cooperative's SuperNode key (``member_keys``), recorded in ``run_start``
    and again in every ``run_resume``, since a resumed run may meet re-registered members.

    A resume with no round left to train (the checkpoint is at ``train.rounds``) appends
    nothing: the run trains no round and writes no summary, so the log stays as the run
    left it (a finished run's log still ends with its run_end, and still verifies).
    """
    key_path = _audit_key_path(run_dir)
    if (run_dir / LOG_NAME).is_file():
        if not key_path.is_file():
            raise FederationError(f"{run_dir / LOG_NAME} exists but its signing key {key_path} is gone; "
                                  f"cannot continue the audit trail")
        try:
            audit = AuditLog(run_dir, private_key_bytes=key_path.read_bytes())
        except AuditError as exc:
            raise FederationError(str(exc)) from None
        from_round = _checkpoint_round(run_dir) if resuming else 0
        if from_round < cfg.train.rounds:
            audit.append("run_resume", {"from_round": from_round,
                                        **({"members": _members_body(members)} if members else {})})
        return audit
    audit = AuditLog(run_dir)
    atomic_write_bytes(key_path, audit.private_key_bytes, mode=0o600)
    escrow = None
    if cfg.secure.aggregation == "he":
        escrow_meta = run_dir / "escrow" / "escrow.json"
        escrow = json.loads(escrow_meta.read_text()) if escrow_meta.is_file() else None
    audit.append("run_start", {
        "config_hash": cfg.hash(), "config": cfg.to_flat(), "mechanism": mechanism(cfg),
        "cooperatives": {str(c): {"name": s["name"], "claimed_train_examples": s["num_train"],
                                  **(members or {}).get(c, {})}
                         for c, s in sorted(cooperatives.items())},
        # The key holder's SuperNode, when it joined with a key: a party of its own.
        **({"custodian": members[CUSTODIAN_ROLE]} if members and CUSTODIAN_ROLE in members else {}),
        "escrow": escrow,
        # Who decides membership (a registrar, with whom it merged) and the stakes votes are weighted by.
        **(electorate or {})})
    return audit


def _members_body(members: dict[int | str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(c): entry for c, entry in sorted(members.items(), key=lambda item: str(item[0]))}


def _checkpoint_round(run_dir: Path) -> int:
    """The round the checkpoint is at (0 without one): where a resumed run starts."""
    checkpoint = Checkpoint.load(run_dir)
    return checkpoint.round if checkpoint is not None else 0


def _copy_escrow(key_dir: Path, run_dir: Path) -> None:
    """The sealed key the oversight board can open travels with the run; the board's shares do not."""
    from .crypto.keys import ESCROW_DIR

    source = key_dir / ESCROW_DIR
    if not source.is_dir():
        return
    target = run_dir / ESCROW_DIR
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            atomic_write_bytes(target / path.name, path.read_bytes())


def _ground_truth(cfg: Config, federation: Any) -> dict[str, Any]:
    """What only the simulation knows: the attackers and every cooperative's compute speed."""
    from .attacks import select_attackers
    from .heterogeneity import compute_speeds

    speeds = compute_speeds(cfg.heterogeneity, federation.num_cooperatives, seed=cfg.seed)
    attackers = select_attackers(federation.num_cooperatives, fraction=cfg.attack.fraction,
                                 cooperatives=cfg.attack.cooperatives, seed=cfg.seed)
    per_cooperative: dict[str, dict[int, Any]] = {"malicious": {c: c in attackers for c in
                                                               range(federation.num_cooperatives)}}
    if federation.has_sybils:  # who is really behind each identity
        per_cooperative["actor"] = {c: federation.actor_of(c) for c in range(federation.num_cooperatives)}
    if cfg.heterogeneity.compute != "off":
        per_cooperative["compute_speed"] = {c: float(v) for c, v in enumerate(speeds)}
    truth: dict[str, Any] = {"attackers": attackers, "per_cooperative": per_cooperative}
    if federation.has_sybils:
        truth["actors"] = {c: federation.actor_of(c) for c in range(federation.num_cooperatives)}
    return truth


def _attack_probe(cfg: Config, federation: Any, model: torch.nn.Module, device: torch.device
                  ) -> Callable[[ArrayRecord], dict[str, Any]] | None:
    """The attack success rate of each new global model on the global test set."""
    if cfg.attack.kind == "off":
        return None
    from .attacks import success_rate, trigger_for

    trigger = trigger_for(federation, size=cfg.attack.trigger_size)
    test = federation.global_test

    def probe(arrays: ArrayRecord) -> dict[str, Any]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return {"attack_success_rate": success_rate(
            cfg.attack.kind, model, test.x, test.y, trigger=trigger, target_label=cfg.attack.target_label,
            num_classes=federation.num_classes, device=device)}

    return probe


RESUME_CONFIG_NAME = "resume.toml"


def write_resume_config(cfg: Config, run_dir: Path) -> Path:
    """``RUN_DIR/resume.toml``: the run's config with ``runtime.resume`` pointing at it, so that one
    ``flwr run . <connection> --run-config RUN_DIR/resume.toml`` continues the run after a restart,
    its members training under the very config they trained with."""
    path = run_dir / RESUME_CONFIG_NAME
    atomic_write_text(path, cfg.replace(**{"runtime.resume": str(run_dir.resolve())}).to_toml())
    return path


def resumed_run(cfg: Config) -> tuple[Config, Path]:
    """The config and directory of the run ``cfg.runtime.resume`` names, after checking that ``cfg``
    (which every member trains with) is that run's config."""
    from .config import ConfigError, load_config

    run_dir = Path(cfg.runtime.resume)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise FederationError(f"runtime.resume: {run_dir} is not a run directory (no config.toml)")
    try:
        own = load_config(config_path)
    except ConfigError as exc:
        raise FederationError(f"runtime.resume: {exc}") from None
    if own.hash() != cfg.hash():
        given = cfg.to_flat()
        differ = sorted(k for k, v in own.to_flat().items() if given.get(k) != v and not k.startswith("runtime."))
        raise FederationError(f"runtime.resume: the run config differs from {config_path} in {', '.join(differ)}; "
                              f"the members train with the run config, so pass it whole: flwr run . <connection> "
                              f"--run-config {run_dir / RESUME_CONFIG_NAME}")
    return own, run_dir


def build_server_app(config: Config | None = None, run_dir: Path | None = None,
                     on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """The ServerApp; with ``config`` it ignores ``context.run_config`` (used by fedgov.simulate)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else Config.from_flat(context.run_config)
        if config is None and cfg.runtime.resume:  # `flwr run` continuing a run, e.g. after a SuperLink restart
            cfg, directory = resumed_run(cfg)
        else:
            directory = run_dir if run_dir is not None else new_run_dir(cfg.runtime.out, cfg.hash())
        if config is None:
            write_resume_config(cfg, directory)
        run_federation(grid, cfg, directory, on_round=on_round)

    return server_app


app = build_server_app()
