"""What a run leaves behind: ``config.toml``, ``metrics.jsonl``, ``summary.json``, a checkpoint.

Every file is replaced atomically, and the checkpoint (the global model after the
last finished round) lets an interrupted run resume where it stopped.
"""

from __future__ import annotations

import io
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from .config import Config
from .results import atomic_write_text, read_jsonl, write_json, write_jsonl
from .strategies.recorder import RoundLog
from .task import pooled_loss

__all__ = ["RunRecord", "Checkpoint", "fairness", "library_versions"]

CHECKPOINT = "checkpoint.npz"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("flwr", "torch", "opacus", "tenseal", "numpy", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fairness(accuracies: list[float]) -> dict[str, float | None]:
    """Spread of per-cooperative accuracy: the worst-off cooperative matters as much as the mean.

    ``p10`` is the accuracy the worst-off tenth of members reach (10th percentile, linear
    interpolation): among thousands of members some hold a handful of test examples, and
    ``worst`` is then 0 in almost every run. ``worst10``, ``best10`` and ``variance_pct2`` are
    q-FFL's (Li et al., ICLR 2020, ``plot_fairness.py``): the mean accuracy of the int(n / 10)
    worst and best members (at least one), and the variance of accuracies in percent squared.
    """
    if not accuracies:
        return {"worst": None, "p10": None, "mean": None, "best": None, "std": None, "worst10": None,
                "best10": None, "variance_pct2": None}
    a = np.sort(np.asarray(accuracies, dtype=float))
    tenth = max(1, int(len(a) * 0.1))
    return {"worst": float(a.min()), "p10": float(np.percentile(a, 10)), "mean": float(a.mean()),
            "best": float(a.max()), "std": float(a.std()), "worst10": float(a[:tenth].mean()),
            "best10": float(a[len(a) - tenth:].mean()), "variance_pct2": float(np.var(a) * 10_000)}


@dataclass
class Checkpoint:
    """The global model after ``round`` rounds and, under DP-SGD, every cooperative's recorded spends.

    ``ledgers`` maps a cooperative to its ``(noise_multiplier, sample_rate, steps)`` per round
    trained (``fedgov.privacy.resume``); they are written in the same file, so in the same
    atomic replace, as the arrays.
    """

    round: int
    arrays: ArrayRecord
    ledgers: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)

    @staticmethod
    def load(run_dir: Path) -> Checkpoint | None:
        path = run_dir / CHECKPOINT
        if not path.is_file():
            return None
        with np.load(path) as data:
            names = [str(n) for n in data["__names__"]]
            arrays = {name: data[f"a{i}"] for i, name in enumerate(names)}
            done = int(data["__round__"])
            raw = json.loads(str(data["__privacy__"])) if "__privacy__" in data.files else {}
        import torch

        ledgers = {int(c): [(float(z), float(q), int(n)) for z, q, n in spends] for c, spends in raw.items()}
        return Checkpoint(round=done, arrays=ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                          ledgers=ledgers)


def mechanism(cfg: Config) -> dict[str, Any]:
    """How updates were protected and combined: the audit log's answer to "under which rules".

    The common fields, then each active mechanism's own (``fedgov.mechanisms``): the HE preset
    and key holder, where DP noise comes from, and ``reveals_updates`` for ``secure.verify``
    runs, in which every cooperative also sends its plaintext update.
    """
    from .mechanisms import audit_fields

    return {"strategy": cfg.strategy.name, "weighting": cfg.governance.weighting,
            "secure_aggregation": cfg.secure.aggregation, "he_preset": None, "dp": cfg.privacy.dp, "dp_noise": None,
            "clip_update_norm": cfg.governance.clip_update_norm or None,
            "max_update_norm": cfg.governance.max_update_norm or None, "reveals_updates": False,
            **audit_fields(cfg)}


class RunRecord:
    """Rows, summary, checkpoint and (with ``audit``) one signed audit record per round.

    ``probe(arrays) -> dict`` adds measurements of each new global model to its row
    (the attack success rate, say); ``ground_truth`` holds what only the simulation
    knows (who the attackers are, compute speeds) and goes to the summary, never to
    the audit log, which records only what the aggregator saw.
    """

    def __init__(self, run_dir: Path, cfg: Config, *, cooperatives: dict[int, dict[str, Any]],
                 num_parameters: int, device: str, audit: Any = None,
                 probe: Callable[[ArrayRecord], dict[str, Any]] | None = None,
                 ground_truth: dict[str, Any] | None = None, registrar: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.registrar = registrar  # who verified identities and whom it merged (fedgov.governance.electorate)
        self.cfg = cfg
        self.cooperatives = dict(sorted(cooperatives.items()))
        self.num_parameters = num_parameters
        self.device = device
        self.audit = audit
        self.probe = probe
        self.ground_truth = ground_truth or {}
        self.rows: list[dict[str, Any]] = []
        self.central_dp = None
        if cfg.privacy.dp == "user":
            from .privacy.central import central_dp
            from .strategies import cohort_size

            self.central_dp = central_dp(cfg, cohort_size=cohort_size(cfg))
        self.resumed_from: int | None = None
        # Server-side start-up before the first round: the ServerApp's own set-up, the nodes
        # joining, discovery (fedgov.server_app); the engine's start before the ServerApp is not in it.
        self.startup_seconds: dict[str, float] = {}
        atomic_write_text(self.run_dir / "config.toml", cfg.to_toml())

    @property
    def rounds_done(self) -> int:
        return len(self.rows)

    def restore(self, checkpoint: Checkpoint) -> None:
        path = self.run_dir / "metrics.jsonl"
        rows = read_jsonl(path) if path.is_file() else []
        # metrics.jsonl is written before the checkpoint, so it may hold one round more.
        self.rows = [r for r in rows if r["round"] <= checkpoint.round]
        if len(self.rows) != checkpoint.round:
            raise RuntimeError(f"{path}: holds {len(self.rows)} rounds but the checkpoint is at "
                               f"round {checkpoint.round}; cannot resume")
        self.resumed_from = checkpoint.round

    def add_round(self, log: RoundLog | None, *, accuracy: float, loss: float,
                  arrays: ArrayRecord | None = None) -> dict[str, Any]:
        from .governance.weighting import influence

        assert log is not None
        rejected = {f["cooperative"] for f in log.failures if f.get("rejected")}
        contributors = sorted(c for c in log.participants if c not in rejected)
        weights = {str(c): w for c, w in sorted(log.weights.items())}
        coop_acc = {str(c): m["eval_acc"] for c, m in sorted(log.client_eval.items()) if "eval_acc" in m}
        # FedProx's training loss: the global model's loss on every member's training data, weighted by its size.
        train_loss = pooled_loss([(m["train_loss"], m["num-train"]) for m in log.client_eval.values()
                                  if "train_loss" in m and m.get("num-train", 0) > 0])
        local_seconds = [m.get("seconds_local_train", 0.0) for m in log.client_train.values()]
        evaluate_seconds = [m.get("seconds_local_evaluate", 0.0) for m in log.client_eval.values()]
        row = {
            "round": log.round,
            "accuracy": accuracy,
            "loss": loss,
            "train_loss": train_loss,
            "seconds": time.perf_counter() - log.started,
            "bytes_up": log.bytes_up,
            "bytes_down": log.bytes_down,
            "bytes_by_stage": log.bytes_by_stage,
            "messages_by_stage": log.messages_by_stage,
            "participants": len(contributors),
            "sampled": log.sampled,
            "contributors": contributors,
            "weights": weights,
            "influence": influence(list(weights.values())) if weights else None,
            "failures": log.failures,
            "phase_seconds": {
                "train": log.seconds_train,
                "local_train_max": max(local_seconds, default=0.0),
                "aggregate": log.seconds_aggregate,
                "evaluate": log.seconds_evaluate,
                "local_evaluate_max": max(evaluate_seconds, default=0.0),
                **log.extra_phase_seconds,
            },
            "cooperative_accuracy": coop_acc,
            "client_train": {str(c): m for c, m in sorted(log.client_train.items())},
            **{f"{k}_cooperative_accuracy": v for k, v in fairness(list(coop_acc.values())).items()
               if k in ("worst", "std")},
            **log.extra,
        }
        if log.applied_weights:  # HE: the weights clients applied, which the aggregator cannot see
            applied = {str(c): w for c, w in sorted(log.applied_weights.items())}
            row["applied_weights"] = applied
            row["applied_influence"] = influence(list(applied.values()))
            row["applied_weight_sum"] = float(sum(applied.values()))
        if self.central_dp is not None:
            row["epsilon"] = self.central_dp.epsilon_after(log.round)
        if self.probe is not None and arrays is not None:
            row.update(self.probe(arrays))
        self.rows.append(row)
        write_jsonl(self.run_dir / "metrics.jsonl", self.rows)
        if self.audit is not None:
            self.audit.append("round", self._audit_body(row, log, arrays))
        return row

    def _epsilon_so_far(self) -> float | None:
        if self.cfg.privacy.dp == "user":
            return self.rows[-1].get("epsilon") if self.rows else None
        if self.cfg.privacy.dp == "sample":
            return max((m["dp_epsilon"] for r in self.rows for m in r["client_train"].values()
                        if "dp_epsilon" in m), default=0.0)
        return None

    def _audit_body(self, row: dict[str, Any], log: RoundLog, arrays: ArrayRecord | None) -> dict[str, Any]:
        from .audit import digest_arrays

        hidden = self.cfg.secure.aggregation == "secagg+"
        body = {
            "round": row["round"],
            "mechanism": mechanism(self.cfg),
            "sampled": row["sampled"],
            "participants": row["contributors"],
            # Under HE the digest is of the ciphertext as received; SecAgg+ leaves nothing per cooperative.
            "updates": None if hidden else {str(c): d for c, d in sorted(log.update_digests.items())},
            "weights": row["weights"],
            "global_model": digest_arrays([a.numpy() for a in arrays.values()]) if arrays is not None else None,
            "dp_epsilon": self._epsilon_so_far(),
            "rejected": [f for f in row["failures"] if f.get("rejected")],
            "missed": [f for f in row["failures"] if not f.get("rejected")],
        }
        if row["round"] == 1:  # later rounds start from the previous record's global_model; round 1 from this
            body["initial_model"] = self._initial_model_digest()
        return body

    def _initial_model_digest(self) -> str | None:
        """Digest of the model round 1 started from, as the strategy archived it when the round began.

        RunRecord never holds the initial model itself; the archived copy is what trace replays,
        so signing its digest now lets trace tell a copy swapped later. None when not retained.
        """
        from .audit import digest_arrays
        from .governance.archive import UpdateArchive

        path = UpdateArchive(self.run_dir).global_file(1)
        return digest_arrays(UpdateArchive.load_arrays(path)) if path.is_file() else None

    def save_checkpoint(self, arrays: ArrayRecord) -> None:
        names = list(arrays.keys())
        payload = {f"a{i}": arrays[name].numpy() for i, name in enumerate(names)}
        ledgers: dict[int, Any] = {}
        if self.cfg.privacy.dp == "sample":  # each cooperative's spends, so that --resume continues them
            from .privacy.resume import recorded_spends

            ledgers = recorded_spends(self.rows)
        buffer = io.BytesIO()
        np.savez(buffer, __names__=np.array(names), __round__=np.array(self.rounds_done),
                 __privacy__=np.array(json.dumps({str(c): s for c, s in ledgers.items()})), **payload)
        path = self.run_dir / CHECKPOINT
        tmp = path.with_name(f".{CHECKPOINT}.tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)

    def summary(self, *, wall_seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        last = self.rows[-1] if self.rows else {}
        final_acc = last.get("cooperative_accuracy", {})
        rounds = max(len(self.rows), 1)
        cooperatives = []
        for coop_id, stats in self.cooperatives.items():
            took_part = sum(coop_id in r.get("contributors", []) for r in self.rows)
            privacy = self._last_privacy(coop_id)
            if self.central_dp is not None and self.rows:  # the same guarantee for every cooperative
                privacy = {"dp_epsilon": self.rows[-1]["epsilon"], "dp_delta": self.central_dp.delta,
                           "dp_noise_multiplier": self.central_dp.noise_multiplier}
            truth = {k: v[coop_id] for k, v in self.ground_truth.get("per_cooperative", {}).items()}
            cooperatives.append({**stats, **truth, "accuracy": final_acc.get(str(coop_id)),
                                 "participation": took_part / rounds,
                                 "epsilon": privacy.get("dp_epsilon"), "delta": privacy.get("dp_delta"),
                                 "noise_multiplier": privacy.get("dp_noise_multiplier")})
        accuracies = [c["accuracy"] for c in cooperatives if c["accuracy"] is not None]
        summary = {
            "run_id": self.run_dir.name,
            "config_hash": cfg.hash(),
            "seed": cfg.seed,
            "final_accuracy": last.get("accuracy"),
            "final_loss": last.get("loss"),
            "accuracy_by_round": [r.get("accuracy") for r in self.rows],  # global test set, for learning curves
            "final_train_loss": last.get("train_loss"),
            "train_loss_by_round": [r.get("train_loss") for r in self.rows],  # None where members did not evaluate
            "rounds": len(self.rows),
            "wall_seconds": wall_seconds,
            "resumed_from_round": self.resumed_from,
            "device": self.device,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or None},
            "versions": library_versions(),
            "dataset": cfg.data.dataset,
            "partition": cfg.data.partition,
            "model": {"name": cfg.model.name, "num_parameters": self.num_parameters},
            "strategy": cfg.strategy.name,
            "bytes_up": sum(r["bytes_up"] for r in self.rows),
            "bytes_down": sum(r["bytes_down"] for r in self.rows),
            "seconds_per_round": sum(r["seconds"] for r in self.rows) / rounds,
            "startup_seconds": dict(self.startup_seconds),
            "bytes_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in self.rows) / rounds,
            "cooperatives": cooperatives,
            "fairness": fairness(accuracies),
            "privacy": self._privacy_block(cooperatives),
            "influence": self._influence_block(),
        }
        from .provenance import code_version  # the code that made this run; fedgov.experiment compares it

        summary["code"] = code_version()
        if cfg.attack.kind != "off" or cfg.attack.size_claim != 1.0 or self.ground_truth.get("attackers"):
            summary["attack"] = self._attack_block()
        if cfg.heterogeneity.compute != "off" or cfg.heterogeneity.deadline > 0:
            summary["compute"] = self._compute_block(cooperatives)
        if self.audit is not None:
            from .audit import LOG_NAME, PUBLIC_KEY_NAME

            summary["audit"] = {"log": LOG_NAME, "public_key": self.audit.public_key_hex,
                                "public_key_file": PUBLIC_KEY_NAME, "records": self.audit.seq + 1}
        from .mechanisms import active

        for m in active(cfg):  # each mechanism's own blocks (secure_aggregation, ...)
            summary.update(m.summary(self.rows, num_parameters=self.num_parameters))
        return summary

    def _influence_block(self) -> dict[str, Any]:
        from .governance.weighting import mean_influence

        block: dict[str, Any] = {"weighting": self.cfg.governance.weighting,
                                 **mean_influence([r["influence"] for r in self.rows if r.get("influence")])}
        # Over the whole run, and per actor (with sybils, simulation ground truth): who holds the weight.
        actors = self.ground_truth.get("actors") or {}
        by_actor = self._actor_totals({str(c): str(a) for c, a in actors.items()})
        block["run"] = self._run_influence(self._actor_totals({}))
        block["run_by_actor"] = self._run_influence(by_actor)
        sybil_actors = {a for c, a in actors.items() if int(c) != int(a)}
        if sybil_actors:  # the share of the run's weight held by whoever registered extra identities
            totals = by_actor
            block["sybil_weight"] = (sum(totals.get(str(a), 0.0) for a in sybil_actors) / sum(totals.values())
                                     if any(totals.values()) else None)
        if self.registrar is not None:
            truth = sum(int(c) != int(a) for c, a in actors.items())
            block["registrar"] = {"name": self.registrar["name"],
                                  "catch_probability": self.registrar["catch_probability"],
                                  "fee_per_identity": self.registrar.get("fee_per_identity", 0.0),
                                  "merged": len(self.registrar["merged"]),
                                  "unpaid": len(self.registrar.get("unpaid", [])), "sybil_identities": truth}
        applied = [r["applied_influence"] for r in self.rows if r.get("applied_influence")]
        if applied:  # HE: what the clients actually applied (known to the simulation, not the aggregator)
            block["applied"] = mean_influence(applied)
            block["applied_weight_sum"] = float(np.mean([r["applied_weight_sum"] for r in self.rows
                                                         if "applied_weight_sum" in r]))
        return block

    @staticmethod
    def _run_influence(totals: dict[str, float]) -> dict[str, Any]:
        """Concentration of the weight each member (or actor) realized over the whole run, every one counted.

        ``totals`` (from :meth:`_actor_totals`): each member's aggregation weight summed over the
        rounds (the weight it applied itself under HE), or with identities given to their actor;
        members that never took part hold 0.
        """
        from .governance.weighting import influence

        if not any(totals.values()):  # no weight realized yet: the measures are undefined
            return {"nakamoto": None, "gini": None, "hhi": None, "max_weight": None, "top_member": None,
                    "members": len(totals), "members_with_weight": 0}
        top = max(totals, key=lambda c: (totals[c], -int(c)))
        return {**influence(list(totals.values())), "top_member": int(top),
                "members": len(totals), "members_with_weight": sum(v > 0 for v in totals.values())}

    def _actor_totals(self, owner: dict[str, str]) -> dict[str, float]:
        """Each member's (or, through ``owner``, actor's) weight summed over the run's rounds."""
        totals = {owner.get(str(c), str(c)): 0.0 for c in sorted(self.cooperatives)}
        for row in self.rows:
            for c, w in (row.get("applied_weights") or row.get("weights") or {}).items():
                totals[owner.get(c, c)] = totals.get(owner.get(c, c), 0.0) + float(w)
        return totals

    def _attack_block(self) -> dict[str, Any]:
        a = self.cfg.attack
        series = [r.get("attack_success_rate") for r in self.rows]
        attackers = [str(c) for c in self.ground_truth.get("attackers", [])]

        def share(weights: dict[str, float]) -> float:
            total = sum(weights.values())
            return sum(weights.get(c, 0.0) for c in attackers) / total if total > 0 else 0.0

        recorded = [share(r["weights"]) for r in self.rows if r.get("weights")]
        # Under HE what clients applied differs from what the aggregator assigned and recorded.
        effective = [share(r.get("applied_weights") or r["weights"]) for r in self.rows if r.get("weights")]
        return {"kind": a.kind, "attackers": self.ground_truth.get("attackers", []),
                "recorded_weight": float(np.mean(recorded)) if recorded else None,
                "effective_weight": float(np.mean(effective)) if effective else None,
                "start_round": a.start_round, "target_label": a.target_label, "size_claim": a.size_claim,
                "success_rate": series[-1] if series else None,
                "success_rate_by_round": series,
                "clean_accuracy_by_round": [r["accuracy"] for r in self.rows]}

    def _compute_block(self, cooperatives: list[dict[str, Any]]) -> dict[str, Any]:
        h = self.cfg.heterogeneity
        speeds = {c["id"]: c.get("compute_speed", 1.0) for c in cooperatives}
        slowest_speed = min(speeds.values(), default=1.0)
        slow = [c for c in cooperatives if c.get("compute_speed", 1.0) <= slowest_speed]
        rest = [c for c in cooperatives if c not in slow]

        def mean(values: list[Any]) -> float | None:
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        return {"mode": h.compute, "deadline": h.deadline or None,
                "slowest": [c["id"] for c in slow], "slowest_speed": slowest_speed,
                "slowest_participation": mean([c["participation"] for c in slow]),
                "slowest_accuracy": mean([c["accuracy"] for c in slow]),
                "others_participation": mean([c["participation"] for c in rest]),
                "others_accuracy": mean([c["accuracy"] for c in rest]),
                "missed": sum(1 for r in self.rows for f in r["failures"] if "deadline" in f.get("reason", ""))}

    def _last_privacy(self, coop_id: int) -> dict[str, float]:
        for row in reversed(self.rows):
            metrics = row["client_train"].get(str(coop_id), {})
            if "dp_epsilon" in metrics:
                return metrics
        return {}

    def _privacy_block(self, cooperatives: list[dict[str, Any]]) -> dict[str, Any]:
        from .mechanisms.dp_sgd import noise_source

        p = self.cfg.privacy
        block: dict[str, Any] = {"mechanism": p.dp}
        if p.dp == "sample":
            epsilons = [c["epsilon"] for c in cooperatives if c["epsilon"] is not None]
            noises = [c["noise_multiplier"] for c in cooperatives if c["noise_multiplier"] is not None]
            deltas = [c["delta"] for c in cooperatives if c["delta"] is not None]
            block.update({
                "level": "example (DP-SGD in each cooperative)",
                "target_epsilon": p.target_epsilon or None,
                "max_epsilon": max(epsilons, default=None),
                "delta": max(deltas, default=None),
                "noise_multiplier": {"min": min(noises, default=None), "max": max(noises, default=None)},
                "max_grad_norm": p.max_grad_norm,
                "grad_sample_mode": p.grad_sample_mode,
                "seeded_noise": p.seeded_noise,
                "noise": noise_source(self.cfg),
            })
            if self.resumed_from is not None:  # the ledgers before the crash came from the checkpoint
                block["resumed_ledger"] = ("each cooperative adopted the spends the aggregator recorded in its "
                                           "checkpoint (trusted; fedgov.privacy.resume)")
        elif self.central_dp is not None:
            dp = self.central_dp
            block.update({
                "level": "cooperative (central noise on clipped updates)",
                "target_epsilon": p.target_epsilon or None,
                "epsilon": self.rows[-1]["epsilon"] if self.rows else 0.0,
                "delta": dp.delta,
                "noise_multiplier": dp.noise_multiplier,
                "clipping_norm": dp.clipping_norm,
                "clipping_side": dp.side,
                "sample_rate": dp.sample_rate,
            })
        return block

    def finish(self, *, wall_seconds: float, arrays: ArrayRecord | None = None) -> dict[str, Any]:
        summary = self.summary(wall_seconds=wall_seconds)
        if self.audit is not None:
            from .audit import digest_arrays

            # The rounds the run claims; verify checks the round records cover exactly these.
            covered = [self.rows[0]["round"], self.rows[-1]["round"]] if self.rows else None
            self.audit.append("run_end", {
                "rounds": len(self.rows), "round_range": covered, "final_accuracy": summary["final_accuracy"],
                "global_model": digest_arrays([a.numpy() for a in arrays.values()]) if arrays is not None else None})
            # The head is known only now: a witness (the board) keeps it to prove where the log ended.
            summary["audit"].update(records=self.audit.seq, head=self.audit.head)
            from logging import INFO

            from flwr.common import log

            log(INFO, "fedgov: audit log head %s (python -m fedgov.audit verify %s --head HASH)",
                self.audit.head, self.run_dir)
        write_json(self.run_dir / "summary.json", summary)
        return summary
