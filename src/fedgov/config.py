"""One typed, validated configuration for every fedgov run.

Configs are TOML files (``configs/*.toml``) whose tables mirror the dataclasses
below. Any key can be overridden with a dotted ``KEY=VALUE`` string, and the
whole config round-trips through the flat ``{"data.alpha": 0.5, ...}`` form
that Flower uses for ``run_config``, so the simulation engine and the
Deployment Engine see exactly the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_checks import (  # noqa: F401
    ROBUST_STRATEGIES,
    check_config,
    cohort_size,
    parse_tiers,
    secagg_cohort_problem,
)
from .config_schema import ConfigError, build_dataclass, flatten, spec, unflatten

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "StrategyConfig",
    "PrivacyConfig",
    "SecureConfig",
    "RuntimeConfig",
    "GovernanceConfig",
    "AttackConfig",
    "HeterogeneityConfig",
    "ParticipationConfig",
    "load_config",
    "parse_override",
    "read_config",
]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "default.toml"


@dataclass
class DataConfig:
    dataset: str = spec("digits", choices=("digits", "breast_cancer", "synthetic", "csv"),
                         doc="which data the cooperatives hold")
    partition: str = spec("dirichlet", choices=("iid", "dirichlet", "powerlaw", "natural"),
                           doc="how the data is split into cooperatives")
    num_cooperatives: int = spec(10, low=1, high=1_000_000,
                                  doc="number of cooperatives (clients); a CSV's natural partition sets it from the data")
    alpha: float = spec(0.5, low=0.0, low_open=True, doc="Dirichlet concentration (label skew)")
    powerlaw_exponent: float = spec(1.5, low=0.0, low_open=True,
                                     doc="size skew of the powerlaw partition: larger = whalier")
    min_examples: int = spec(10, low=1, doc="fewest training examples any cooperative holds")
    test_fraction: float = spec(0.2, low=0.0, high=0.9, low_open=True,
                                 doc="share of all data held out as the global test set")
    local_test_fraction: float = spec(0.2, low=0.0, high=0.9, low_open=True,
                                       doc="share of each cooperative's data kept as its local test split")
    path: str = spec("", doc="CSV file (dataset = 'csv')")
    label_column: str = spec("label", doc="CSV column holding the class label")
    cooperative_column: str = spec("", doc="CSV column naming each row's cooperative (natural partition): one "
                                            "cooperative per distinct value, in sorted order, named after it")
    synthetic_alpha: float = spec(1.0, low=0.0, doc="Synthetic(alpha, beta): model heterogeneity")
    synthetic_beta: float = spec(1.0, low=0.0, doc="Synthetic(alpha, beta): feature heterogeneity")
    synthetic_iid: bool = spec(False, doc="Synthetic-IID of FedProx (data/synthetic_iid/generate_iid.py): one "
                                           "W and b for every device and x ~ N(0, diag(j^-1.2)), so the task is "
                                           "one linear rule (synthetic_alpha and synthetic_beta unused)")
    synthetic_reference: bool = spec(False, doc="Synthetic as the FedProx / q-FFL reference scripts make it "
                                                 "(litian96/FedProx data/synthetic_*/generate_*.py): device sizes "
                                                 "int(lognormal(4, 2)) + 50 (synthetic_samples unused), numpy's legacy "
                                                 "generator seeded with the data seed, and a random split of each "
                                                 "device, local_test_fraction held out; the test set is the union of "
                                                 "the devices' test splits (test_fraction unused). Needs "
                                                 "partition = 'natural'")
    synthetic_features: int = spec(60, low=1, doc="Synthetic: input dimension")
    synthetic_classes: int = spec(10, low=2, doc="Synthetic: number of classes")
    synthetic_samples: int = spec(4000, low=10, doc="Synthetic: total examples over all cooperatives")
    seed: int = spec(-1, low=-1, doc="the data seed: fixes the dataset (synthetic draws), the global test set and "
                                      "the partition, so one federation can be rerun under many run seeds "
                                      "(-1: the run's seed)")
    sybil_identities: int = spec(0, low=0, high=10_000,
                                  doc="extra identities one actor registers (0: none); they join as cooperatives "
                                      "num_cooperatives, num_cooperatives + 1, ...")
    sybil_actor: int = spec(-1, low=-1, doc="the cooperative behind the extra identities (-1: the largest)")
    sybil_mode: str = spec("split", choices=("split", "copies", "none"),
                            doc="split: the actor's data is dealt across itself and its identities; copies: each "
                                "identity holds a copy of the actor's data; none: no extra identities whatever "
                                "data.sybil_identities says (an experiment's no-sybil baseline)")


@dataclass
class ModelConfig:
    name: str = spec("mlp", choices=("logreg", "mlp", "cnn"), doc="model architecture")
    hidden: int = spec(64, low=1, doc="hidden width of the MLP / channels of the CNN")


@dataclass
class TrainConfig:
    rounds: int = spec(20, low=1, doc="federated rounds")
    local_epochs: int = spec(2, low=1, doc="local epochs per round")
    batch_size: int = spec(16, low=1, doc="local mini-batch size")
    lr: float = spec(0.05, low=0.0, low_open=True, doc="local SGD learning rate")
    momentum: float = spec(0.9, low=0.0, high=0.999, doc="local SGD momentum")
    evaluate_every: int = spec(0, low=0, doc="every cooperative evaluates the global model on its local test split "
                                              "every this many rounds, and after the last (0: every round up to "
                                              "100 cooperatives, else every 10; the global test set: every round)")


@dataclass
class StrategyConfig:
    name: str = spec("fedavg", choices=("fedavg", "fedprox", "median", "trimmed_mean", "krum",
                                         "multikrum", "bulyan", "qfedavg"),
                      doc="aggregation strategy (Flower's implementations)")
    fraction_train: float = spec(1.0, low=0.0, high=1.0, low_open=True,
                                  doc="share of cooperatives sampled each round")
    clients_per_round: int = spec(0, low=0, doc="exactly this many cooperatives sampled each round, as the "
                                                 "FedProx and q-FFL papers do (0: fraction_train decides)")
    sampling: str = spec("uniform", choices=("uniform", "size"),
                          doc="how the cohort is drawn, without replacement: uniformly (the FedProx code), or with "
                              "probability proportional to training examples (q-FFL's sampling 2, FedProx's "
                              "Algorithm 1: pair it with governance.weighting = 'equal' for their plain average)")
    proximal_mu: float = spec(0.01, low=0.0, doc="FedProx proximal term")
    trim_beta: float = spec(0.2, low=0.0, high=0.49, doc="trimmed mean: share cut at each end")
    num_malicious: int = spec(0, low=0, doc="Krum/Bulyan: assumed number of attackers")
    qfedavg_q: float = spec(0.2, low=0.0, doc="q-FedAvg fairness parameter")

    def cohort_size(self, population: int) -> int:
        """How many of ``population`` cooperatives this strategy samples a round (see :func:`cohort_size`)."""
        return cohort_size(self.fraction_train, population, self.clients_per_round)


@dataclass
class PrivacyConfig:
    dp: str = spec("off", choices=("off", "sample", "user"),
                    doc="differential privacy: per example in each cooperative (Opacus DP-SGD) or per cooperative (central)")
    target_epsilon: float = spec(0.0, low=0.0,
                                  doc="epsilon budget for the whole run; the noise is derived from it (0 = none)")
    noise_multiplier: float = spec(0.0, low=0.0,
                                    doc="noise multiplier; 0 = derive from target_epsilon")
    delta: float = spec(0.0, low=0.0, high=0.1,
                         doc="delta; 0 = 1/(10 n), below 1/n of each cooperative (or of the cooperatives for 'user')")
    max_grad_norm: float = spec(1.0, low=0.0, low_open=True, doc="per-example gradient clipping bound (dp = 'sample')")
    grad_sample_mode: str = spec("hooks", choices=("hooks", "functorch", "ghost"),
                                  doc="how Opacus computes per-example gradients ('ghost' = ghost clipping)")
    seeded_noise: bool = spec(False, doc="DP-SGD noise and sampling from the seed (reproducible research runs) "
                                          "instead of the OS's randomness; the guarantee then holds only against "
                                          "parties without the config")
    update_clip_norm: float = spec(1.0, low=0.0, low_open=True,
                                    doc="clipping bound of each cooperative's update (dp = 'user')")
    clipping_side: str = spec("server", choices=("server", "client"),
                               doc="where updates are clipped for dp = 'user' (Flower's fixed-clipping wrappers)")


@dataclass
class SecureConfig:
    aggregation: str = spec("off", choices=("off", "he", "secagg+"),
                             doc="hide individual updates from the aggregator: TenSEAL CKKS/BFV or Flower's SecAgg+")
    preset: str = spec("standard", doc="HE parameter preset (see docs/he_presets.md)")
    key_holder: str = spec("clients", choices=("clients", "custodian"),
                            doc="who can decrypt aggregates: the cooperatives, or a separate oversight custodian")
    key_dir: str = spec("", doc="folder of provisioned HE keys (python -m fedgov.crypto.keys); "
                              "simulate makes one in the run directory")
    verify: bool = spec(False, doc="measurement only: every cooperative also sends its plaintext update, so the "
                                    "aggregator sees each one (marked reveals_updates), to record the max abs "
                                    "error of secure aggregation")
    secagg_num_shares: int = spec(3, low=2, doc="SecAgg+: shares of each secret (neighbours per client)")
    secagg_threshold: int = spec(2, low=1, doc="SecAgg+: shares needed to reconstruct a secret")
    secagg_clip_range: float = spec(8.0, low=0.0, low_open=True, doc="SecAgg+: updates are clipped to +-this before quantization")
    secagg_quantization_range: int = spec(4194304, low=2, doc="SecAgg+: number of quantization levels")


@dataclass
class GovernanceConfig:
    weighting: str = spec("samples", choices=("samples", "equal", "sqrt", "capped", "stake"),
                           doc="aggregation weight of each cooperative: by data size (FedAvg), one cooperative "
                               "one vote, square root of size, size capped at governance.cap, or by stake "
                               "(governance.stake; a DAO's token vote)")
    cap: float = spec(0.2, low=0.0, high=1.0, low_open=True,
                       doc="largest share of the total weight one cooperative may hold (weighting = 'capped')")
    stake: str = spec("pareto", choices=("pareto", "size"),
                       doc="weighting = 'stake': each actor's stake, drawn from a Pareto distribution "
                           "(governance.stake_shape) independently of its data, or equal to its number of "
                           "training examples; an actor's identities share its stake")
    stake_shape: float = spec(1.16, low=0.0, low_open=True,
                               doc="shape of the Pareto stakes (1.16: the top 20% hold about 80%; smaller is "
                                   "more unequal)")
    registrar: str = spec("", doc="a party outside the federation that verifies identities before they are "
                                   "weighted, named in the audit log ('' = none: anyone may register identities)")
    registrar_catch: float = spec(0.0, low=0.0, high=1.0,
                                   doc="chance that governance.registrar sees through each sybil identity, "
                                       "which is then merged into its actor before weighting")
    registrar_fee: float = spec(0.0, low=0.0,
                                 doc="the registrar's second model: a fee per identity, paid from each actor's "
                                     "governance.identity_budget; identities an actor cannot pay for are merged "
                                     "into it (0 = no fee)")
    identity_budget: float = spec(0.0, low=0.0,
                                   doc="what each actor can spend on registrar fees: it registers "
                                       "floor(budget / fee) identities, at least its own")
    max_update_norm: float = spec(1000.0, low=0.0,
                                   doc="reject a plaintext update whose change to the global model has a larger "
                                       "L2 norm, as malformed (0 = no bound)")
    clip_update_norm: float = spec(0.0, low=0.0,
                                    doc="defense: clip each plaintext update's change to this L2 norm before "
                                        "aggregating (0 = off)")
    similarity_defense: bool = spec(False, doc="defense against sybils (FoolsGold-style): scale each plaintext "
                                                "update's weight by 1 - its highest cosine similarity to another "
                                                "update of the round, the least similar keeping its full weight")
    retain_updates: bool = spec(True, doc="keep every received update (the ciphertext under HE) with the run, "
                                           "for python -m fedgov.audit trace")
    board_size: int = spec(5, low=2, high=255, doc="HE escrow: members of the oversight board holding key shares")
    board_threshold: int = spec(3, low=2, high=255,
                                 doc="HE escrow: board shares needed to decrypt individual updates")


@dataclass
class AttackConfig:
    kind: str = spec("off", choices=("off", "label_flip", "backdoor", "model_replacement", "noise"),
                      doc="what malicious cooperatives do")
    fraction: float = spec(0.0, low=0.0, high=1.0, doc="share of cooperatives that are malicious (seeded choice)")
    cooperatives: str = spec("", doc="comma-separated ids of the malicious cooperatives (overrides attack.fraction)")
    start_round: int = spec(1, low=1, doc="first round of the attack; before it attackers behave honestly (sleepers)")
    target_label: int = spec(0, low=0, doc="label the backdoor trigger should produce")
    poison_fraction: float = spec(0.5, low=0.0, high=1.0, low_open=True,
                                   doc="backdoor: triggered copies added, as a share of the attacker's examples")
    trigger_size: int = spec(4, low=1, doc="backdoor: pixels (features) the trigger sets")
    boost: float = spec(0.0, low=0.0, doc="model_replacement: update scale (0 = cohort size / attackers)")
    noise_std: float = spec(1.0, low=0.0, low_open=True, doc="noise: std of the noise sent instead of an update")
    size_claim: float = spec(1.0, low=0.0, low_open=True,
                              doc="factor by which malicious cooperatives overstate their data size (1 = honest)")


@dataclass
class HeterogeneityConfig:
    compute: str = spec("off", choices=("off", "tiers", "lognormal"),
                         doc="cooperatives' compute speeds: all equal, tiers (heterogeneity.tiers) or log-normal")
    tiers: str = spec("1.0,0.3,0.1", doc="comma-separated relative speeds; cooperatives are dealt to tiers "
                                          "in a seeded order")
    sigma: float = spec(1.0, low=0.0, low_open=True, doc="spread of log-normal speeds (std of the log)")
    step_seconds: float = spec(0.02, low=0.0, low_open=True,
                                doc="simulated seconds of one local training step at speed 1")
    deadline: float = spec(0.0, low=0.0, doc="round deadline in simulated seconds: slower cooperatives miss "
                                              "the round (0 = none)")
    stragglers: float = spec(0.0, low=0.0, high=1.0,
                              doc="FedProx's systems heterogeneity (Li et al., MLSys 2020, section 5.2): this share of "
                                  "each round's cohort are stragglers; round(m (1 - share)) members chosen at random "
                                  "finish train.local_epochs, each straggler manages a uniform 1..local_epochs - 1")
    straggler_work: str = spec("drop", choices=("drop", "partial"),
                                doc="what the server does with stragglers: drop them (FedAvg in the paper: the "
                                    "round goes on without them) or keep their partial work (FedProx)")


@dataclass
class ParticipationConfig:
    model: str = spec("always", choices=("always", "turnout", "size"),
                       doc="who shows up each round before the server samples strategy.fraction_train of them: "
                           "every member, each with probability participation.turnout, or with a probability "
                           "that grows with its size")
    turnout: float = spec(1.0, low=0.0, high=1.0, low_open=True,
                           doc="mean probability that a member shows up in a round (models turnout and size)")
    size_exponent: float = spec(1.0, low=0.0,
                                 doc="model size: a member's probability is proportional to its size to this "
                                     "power (0: all alike; 1: in proportion, large members nearly always, small "
                                     "ones rarely), capped at 1 and scaled so the mean is participation.turnout")


@dataclass
class RuntimeConfig:
    device: str = spec("auto", choices=("auto", "cpu", "cuda"), doc="where clients train")
    engine: str = spec("pool", choices=("pool", "flower"),
                        doc="simulation engine: 'pool' (fedgov's pool of workers behind Flower's Grid) or "
                            "'flower' (Flower's own run_simulation on Ray)")
    workers: int = spec(-1, low=-1, doc="pool engine: worker processes (-1: one per core; 0: every ClientApp in "
                                         "the server's own process, for debugging and profiling); with "
                                         "runtime.ray_address, Ray actors (-1: one per client_cpus CPUs)")
    client_cpus: float = spec(1.0, low=0.0, low_open=True,
                               doc="CPUs reserved per simulated client (Flower's engine) or per Ray actor of the pool")
    client_gpu_fraction: float = spec(0.25, low=0.0, high=1.0,
                                       doc="GPU share per simulated client (Flower's engine) or per Ray actor of the "
                                           "pool, when training on CUDA")
    poll_interval: float = spec(0.005, low=0.0, high=1.0, low_open=True,
                                 doc="Flower's engine: seconds between its grid's polls for replies (Flower's "
                                     "default, 0.1, would quantize every phase time); the pool engine does not poll")
    ray_address: str = spec("", doc="an existing Ray cluster to simulate on ('auto' or HOST:PORT of its head); "
                                     "empty: a local Ray instance of fedgov's own, never a cluster merely "
                                     "recorded on this machine")
    out: str = spec("runs", doc="folder under which run directories are made")
    round_timeout: float = spec(3600.0, low=0.0, low_open=True,
                                 doc="seconds a round (each SecAgg+ stage) waits for its members' replies before "
                                     "it goes on without them (Flower's default; a dead SuperNode is also given "
                                     "up once it misses two heartbeats, about 60 s)")
    resume: str = spec("", doc="with `flwr run`: continue this run directory from its checkpoint (after a "
                                "SuperLink restart: pass the run's resume.toml, which sets it; fedgov.simulate "
                                "has --resume)")


@dataclass
class Config:
    seed: int = spec(0, low=0, doc="fixes partitions (unless data.seed is set), initialisation and client sampling")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)
    governance: GovernanceConfig = field(default_factory=GovernanceConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    heterogeneity: HeterogeneityConfig = field(default_factory=HeterogeneityConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # ---- conversions -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys and scalar values, as Flower's ``run_config`` holds them."""
        return flatten(self.to_dict())

    @classmethod
    def from_flat(cls, flat: typing.Mapping[str, Any], *, source: str = "run_config") -> Config:
        """Rebuild from dotted keys; keys that are not fedgov's are an error."""
        return build_config(unflatten(dict(flat)), source=source)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def hash(self) -> str:
        """Hash of everything that can change the metrics (not where they are written)."""
        payload = self.to_dict()
        payload["runtime"] = {k: v for k, v in payload["runtime"].items() if k == "device"}
        payload["secure"] = {k: v for k, v in payload["secure"].items() if k != "key_dir"}
        payload["governance"] = {k: v for k, v in payload["governance"].items() if k != "retain_updates"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted keys overridden and validated, e.g. ``replace(**{"data.alpha": 1.0})``."""
        flat = self.to_flat()
        for key, value in dotted.items():
            _check_known(key, "override")
            flat[key] = value
        return Config.from_flat(flat, source="override")


def build_config(raw: typing.Mapping[str, Any], *, source: str = "config") -> Config:
    cfg = build_dataclass(Config, raw, "", source)
    check_config(cfg, source)
    return cfg


_DEFAULTS = Config().to_flat()
_KNOWN_KEYS = frozenset(_DEFAULTS)


def _check_known(key: str, where: str) -> None:
    if key not in _KNOWN_KEYS:
        raise ConfigError(f"{where}: {key}: unknown key")


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.alpha=0.1"`` -> ``("data.alpha", 0.1)``; values are TOML (bare words are strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    _check_known(key, "--set")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as `fedprox`
    if isinstance(_DEFAULTS[key], str) and not isinstance(value, str):
        value = raw  # a text key given digits, e.g. attack.cooperatives=2
    return key, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML file (default ``configs/default.toml``) and apply ``KEY=VALUE`` overrides."""
    return read_config(path, overrides)[0]


def read_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()
                ) -> tuple[Config, frozenset[str]]:
    """:func:`load_config`, and the dotted keys the file or the overrides set explicitly.

    Some values follow from the data unless the user fixed them (``data.num_cooperatives``
    of a natural partition); the caller needs to know which ones the user fixed.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not path.is_file():
        if path == DEFAULT_CONFIG_PATH:
            raw: dict[str, Any] = {}  # an installed package without the repo's configs/
        else:
            raise ConfigError(f"{path}: no such config file")
    else:
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    flat = flatten(raw)
    for key in flat:
        _check_known(key, str(path))
    # configs/default.toml only spells out the defaults; the user fixes what their own file or --set says.
    given = set() if path.resolve() == DEFAULT_CONFIG_PATH else set(flat)
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
        given.add(key)
    source = str(path) if not overrides else f"{path} with --set"
    return Config.from_flat(flat, source=source), frozenset(given)


def reference_rows() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every key: the site's configuration reference comes from here."""
    rows: list[tuple[str, Any, str]] = []

    def walk(cls: type, prefix: str) -> None:
        instance = cls()
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
                continue
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += f" ({' / '.join(f.metadata['choices'])})"
            rows.append((f"{prefix}{f.name}", value, doc))

    walk(Config, "")
    return rows


def reference_table() -> str:
    """Every key as a Markdown table (key, default, meaning): printed by ``python -m fedgov.config``,
    and the documentation site's configuration reference."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in reference_rows():
        lines.append(f"| `{key}` | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def pyproject_app_config() -> str:
    """The ``[tool.flwr.app.config]`` tables: every key, so ``flwr run --run-config`` accepts them all."""
    import tomli_w

    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": Config().to_dict()}}}}).replace(
        "[tool]\n", "").replace("[tool.flwr]\n", "").replace("[tool.flwr.app]\n", "").lstrip()


def sync_pyproject(path: Path) -> None:
    """Rewrite the app config of ``pyproject.toml`` from the defaults above (run after adding a key)."""
    text = path.read_text()
    head, marker, _ = text.partition("[tool.flwr.app.config]")
    if not marker:
        raise ConfigError(f"{path}: no [tool.flwr.app.config] table")
    path.write_text(head + pyproject_app_config())


def main(argv: typing.Sequence[str] | None = None) -> int:
    """``python -m fedgov.config``: print the key table, or rewrite pyproject.toml's app config."""
    from .cli import ArgumentParser

    p = ArgumentParser(prog="python -m fedgov.config",
                       description="Print every config key with its default and meaning (a Markdown table), "
                                   "as the documentation's configuration reference shows it.")
    p.add_argument("--sync-pyproject", nargs="?", type=Path, const=DEFAULT_CONFIG_PATH.parents[1] / "pyproject.toml",
                   default=None, metavar="PYPROJECT",
                   help="instead, rewrite the [tool.flwr.app.config] tables of PYPROJECT (default: the "
                        "checkout's pyproject.toml) from the defaults, after adding a key")
    args = p.parse_args(argv)
    if args.sync_pyproject is not None:
        try:
            sync_pyproject(args.sync_pyproject)
        except (ConfigError, OSError) as exc:
            from .cli import fail

            fail("python -m fedgov.config", str(exc))
        print(args.sync_pyproject)
        return 0
    print(reference_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
