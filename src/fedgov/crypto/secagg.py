"""Flower's SecAgg+ secure aggregation for fedgov: the one adapter to Flower's legacy stack.

In Flower 1.42 SecAgg+ exists only on the legacy stack (``SecAggPlusWorkflow`` as the
``fit_workflow`` of a ``DefaultWorkflow`` driving a legacy ``FedAvg`` through a
``LegacyContext``; ``secaggplus_mod`` around a legacy fit handler on the client). Every
use of that stack in fedgov is in this module; the rest of fedgov stays on the Message
API and calls only:

* client side: :func:`is_secagg_message` and :func:`secagg_train` (from the ClientApp's
  train handler);
* server side: :func:`run_secagg_rounds` (from ``run_federation``) and
  :func:`summary_block` (from ``RunRecord.summary``).

Message flow of one round (every stage is a ``MessageType.TRAIN`` message whose content
holds Flower's ``"secaggplus_configs"`` ConfigRecord; that record is how
:func:`is_secagg_message` tells them from fedgov's plain train messages):

1. ``setup``: the server sends the protocol parameters to the sampled cooperatives;
   each answers with two public keys.
2. ``share_keys``: the server forwards each cooperative its neighbours' public keys;
   each answers with Shamir shares of its mask seed and first private key, encrypted
   for each neighbour.
3. ``collect_masked_vectors``: the server forwards the encrypted shares together with
   the legacy ``FitIns`` (the global model). ``secaggplus_mod`` calls the handler that
   :func:`secagg_train` gives it, which converts the ``FitIns`` to numpy arrays, runs
   fedgov's own local training (``fit``) and returns a legacy ``FitRes``; the mod then
   weights, clips, quantizes and masks the parameters and sends only the masked
   integer vector (the FitRes's arrays are emptied; its ``num_examples`` and
   ``metrics`` still travel in the clear, as in Flower).
4. ``unmask``: the server asks for the shares that remove the masks (mask seeds of the
   cooperatives that sent a vector, private keys of those that dropped out), sums the
   masked vectors, unmasks and dequantizes the weighted sum. Only that sum reaches the
   legacy ``FedAvg``.

Weighting. Legacy ``FedAvg`` weights by ``num_examples``; under SecAgg+ the weight is
applied inside the mask: cooperative *i* uploads ``[q_i, Quantize(clip(w_i * p_i))]``
(masked) with ``q_i = round(n_i / max_weight * Q)``, ``w_i = q_i / Q`` and ``Q`` the
quantization range. The server recovers ``sum_i q_i`` and ``sum_i w_i p_i`` and divides,
so the aggregate is the FedAvg ``sum_i n_i p_i / sum_i n_i`` up to the rounding of the
weights to multiples of ``1/Q`` (relative error at most ``1 / (2 Q w_i)``). Each round
fedgov sets ``max_weight`` to the largest training-set size in the sampled cohort
(sizes are known from discovery, and ``num_examples`` travels in the clear anyway), so
that ``w_i <= 1`` (no overflow) and the largest weight is exactly 1. The legacy
``FedAvg.aggregate_fit`` then averages identical copies of that aggregate (the
identity). Note that clipping acts on ``w_i * p_i``: with ``w_i <= 1`` a parameter is
clipped only if ``|p| > clip_range / w_i >= clip_range``. Flower masks the trained
*parameters* (the whole model), not the difference to the global model, so
``secure.secagg_clip_range`` must bound the model's parameters.

Quantization error (``secure.verify = true``). With stochastic rounding every client's
quantized value is within one quantization step ``2 c / Q`` of its exact value (``c`` =
``secure.secagg_clip_range``); the aggregate divides the sum of ``k`` such values by
``sum_i w_i``. So against a plaintext FedAvg of the *same* clipped, weighted updates::

    max_abs_error < error_bound = k * (2 c / Q) / sum_i w_i

(plus float64 rounding, about 1e-15 relative). While the cohort's largest cooperative
takes part, ``sum_i w_i >= 1`` and so ``error_bound <= k * 2 c / Q``; with equal sizes
``sum_i w_i ~ k`` and it is about one step ``2 c / Q`` (3.8e-6 with the defaults).
It is recorded per round as ``error_bound``. The client hands the quantizer float64 arrays, so the error measured
is SecAgg+'s own, not float32 rounding inside the quantizer. ``max_abs_error_vs_fedavg``
compares with the exact, unclipped FedAvg ``sum n_i p_i / sum n_i`` instead (clipping
and weight rounding included).

Measurement-only leak: with ``secure.verify = true`` each cooperative ALSO sends its
unmasked trained parameters in a separate ArrayRecord (``VERIFY_RECORD``), which defeats
the point of secure aggregation. It exists only to measure the quantization error,
is never used for the model, and its bytes are not counted as protocol bytes
(``verify_bytes_up`` reports them separately). A cooperative leaks only when its own
config says ``secure.verify = true``; the server cannot ask for it. Never enable it where
the privacy of updates matters.

What is measured per round (``metrics.jsonl``): ``bytes_up``/``bytes_down`` are the
bytes of every record of every message of the four stages (ArrayRecords by
``count_bytes()``, ConfigRecords and MetricRecords by the size of their keys and
values: bytes and strings by length, numbers 8 bytes, booleans 1), so they include
keys, ciphertexts, shares and masked vectors (Flower sends these as int64: 8 bytes per
parameter). Plaintext runs count only the model ArrayRecords (float32, 4 bytes per
parameter). ``phase_seconds``: ``train`` = the ``collect_masked_vectors`` stage (local
training and masking included), ``aggregate`` = the ``unmask`` stage (share collection,
mask removal, dequantization, FedAvg), ``evaluate`` = fedgov's per-cooperative
evaluation, and ``secagg_setup``, ``secagg_share_keys``, ``secagg_collect_masked_vectors``,
``secagg_unmask`` for each stage. ``secure_aggregation`` holds bytes per stage and, under
``verify``, the errors.

Reproducibility: fedgov's ``CohortSampler`` picks the cohort as in plaintext runs, and
the FitIns config carries a seed derived from ``(seed, round, cooperative)``
(``SEED_KEY``) with which each cooperative seeds numpy's global generator (Flower's
stochastic rounding draws from it) for the masking stage, restoring it afterwards.
The masks themselves use ``os.urandom`` and cancel exactly (integer arithmetic modulo
``2**32``), so the aggregate is a deterministic function of the trained models and a
SecAgg+ run repeats (and resumes) exactly. The rounding seed protects nothing: the
masks, not the rounding, hide the updates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from ..client_errors import failure_of
from ..traffic import SECAGG_VERIFY_RECORD, content_bytes
from ..config import cohort_size, secagg_cohort_problem
from ..sampling import evaluates_cooperatives, evaluation_interval

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from ..config import Config
    from ..sampling import CohortSampler
    from ..strategies.recorder import RoundLog


class RoundRecord(Protocol):
    """What the SecAgg+ round loop needs of the run's record (``fedgov.run_record.RunRecord`` is one;
    named by its shape, so that this module does not import the record that reports on it)."""

    cooperatives: dict[int, dict[str, Any]]

    def add_round(self, log: RoundLog, *, accuracy: float, loss: float,
                  arrays: ArrayRecord | None = None) -> dict[str, Any]: ...

    def save_checkpoint(self, arrays: ArrayRecord) -> None: ...

__all__ = [
    "MODULUS_RANGE",
    "STAGES",
    "VERIFY_RECORD",
    "is_secagg_message",
    "secagg_train",
    "run_secagg_rounds",
    "summary_block",
    "error_bound",
]

# Flower's default: masks and sums live in the integers modulo 2**32.
MODULUS_RANGE = 2**32
STAGES: tuple[str, ...] = tuple(Stage.all())  # setup, share_keys, collect_masked_vectors, unmask

# Key fedgov adds to the legacy FitIns config (scalars only: legacy configs hold no lists).
SEED_KEY = "fedgov.secagg.rounding-seed"
# Reply record with the UNMASKED parameters, only with secure.verify = true (measurement only).
VERIFY_RECORD = SECAGG_VERIFY_RECORD

FitFn = Callable[[list[np.ndarray], dict[str, Any]], tuple[list[np.ndarray], int, dict[str, float]]]


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------

def is_secagg_message(message: Message) -> bool:
    """Whether ``message`` is one of the four SecAgg+ stages (all are TRAIN messages)."""
    return (message.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in message.content.config_records)


@contextmanager
def _numpy_seeded(seed: int | None) -> Iterator[None]:
    """Seed numpy's global generator (Flower's stochastic rounding draws from it) for a while."""
    if seed is None:
        yield
        return
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def secagg_train(message: Message, context: Context, *, fit: FitFn,
                 declined: Mapping[type[BaseException], int] | None = None, verify: bool = False) -> Message:
    """Answer one SecAgg+ stage with Flower's ``secaggplus_mod``; local training is ``fit``.

    ``fit(arrays, config) -> (arrays, num_examples, metrics)`` trains the model given as
    numpy arrays (state_dict order) with the round's config (``server-round``, and
    ``proximal-mu`` for FedProx). It runs only in the ``collect_masked_vectors`` stage.
    Exceptions of a type in ``declined`` (e.g. a spent privacy budget) become an Error
    reply with the mapped code: the cooperative drops out of the round, which SecAgg+
    tolerates as long as enough neighbours remain.

    ``verify`` (the cooperative's OWN ``secure.verify``, never a flag from the server,
    which is the party SecAgg+ protects against) also sends the unmasked parameters in
    ``VERIFY_RECORD``: a measurement-only leak (module docstring).
    """
    captured: dict[str, Any] = {}

    def call_next(msg: Message, ctxt: Context) -> Message:  # noqa: ARG001  (the legacy fit handler)
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        config.pop(SEED_KEY, None)
        arrays, num_examples, metrics = fit(parameters_to_ndarrays(fitins.parameters), config)
        # float64 so that the quantizer's arithmetic adds no float32 rounding of its own.
        arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
        if verify:
            captured["arrays"] = arrays
        fitres = FitRes(status=Status(code=Code.OK, message="Success"), parameters=ndarrays_to_parameters(arrays),
                        num_examples=int(num_examples), metrics=dict(metrics))
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    seed = None
    stage = message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    if stage == Stage.COLLECT_MASKED_VECTORS and "fitins.config" in message.content.config_records:
        raw = message.content.config_records["fitins.config"].get(SEED_KEY)
        seed = int(raw) if raw is not None else None
    try:
        with _numpy_seeded(seed):
            reply = secaggplus_mod(message, context, call_next)
    except tuple(declined or ()) as exc:
        code = next(c for kind, c in (declined or {}).items() if isinstance(exc, kind))
        return Message(Error(code=code, reason=str(exc)), reply_to=message)
    if "arrays" in captured:  # secure.verify: the measurement-only plaintext copy
        reply.content[VERIFY_RECORD] = ArrayRecord(captured["arrays"])
    return reply


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------

def error_bound(*, num_clients: int, clip_range: float, quantization_range: int, weight_sum: float) -> float:
    """Bound on |SecAgg+ aggregate - plaintext FedAvg of the same clipped updates| (module docstring)."""
    return num_clients * (2.0 * clip_range / quantization_range) / weight_sum


def _effective_weight(num_examples: int, max_weight: float, quantization_range: int) -> float:
    """The weight ``w_i`` secaggplus_mod applies (n / max_weight rounded to 1/Q)."""
    return round(num_examples / max_weight * quantization_range) / quantization_range


@dataclass
class _RoundState:
    """What fedgov measures in one SecAgg+ round."""

    log: RoundLog
    bytes: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {"up": 0, "down": 0} for s in STAGES})
    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    halted_at: str | None = None
    max_weight: float = 1.0
    num_shares: int = 0
    threshold: int = 0
    num_examples: dict[int, int] = field(default_factory=dict)
    plaintext: dict[int, list[np.ndarray]] = field(default_factory=dict)
    verify_bytes_up: int = 0
    aggregate: list[np.ndarray] | None = None  # float64, before the cast to the model's dtypes


class _Tracker:
    """Shared by the counting grid, the legacy strategy and the workflow: the round in flight."""

    def __init__(self, node_to_cooperative: Mapping[int, int], round_offset: int) -> None:
        self.node_to_cooperative = dict(node_to_cooperative)
        self.cooperative_to_node = {c: n for n, c in self.node_to_cooperative.items()}
        self.round_offset = round_offset
        self.current: _RoundState | None = None
        self.stage: str | None = None

    def cooperative(self, node_id: int) -> int:
        return self.node_to_cooperative.get(node_id, -1)


class _CountingGrid:
    """A Grid that counts the bytes of every message of each SecAgg+ stage and reads the replies."""

    def __init__(self, grid: Grid, tracker: _Tracker) -> None:
        self._grid = grid
        self._tracker = tracker

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        tracker = self._tracker
        state, stage = tracker.current, tracker.stage
        messages = list(messages)
        if state is None or stage is None:  # not a SecAgg+ stage (never happens in fedgov's flow)
            return self._grid.send_and_receive(messages, timeout=timeout)
        state.bytes[stage]["down"] += sum(content_bytes(m.content) for m in messages)
        labelled = getattr(self._grid, "stage", None)  # a TrafficMeter counts the stage under its own name
        with labelled(f"secagg_{stage}") if labelled is not None else contextlib.nullcontext():
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        log = state.log
        for reply in sorted(replies, key=lambda m: tracker.cooperative(m.metadata.src_node_id)):
            coop = tracker.cooperative(reply.metadata.src_node_id)
            if reply.has_error():
                failure = failure_of(reply, coop, phase=f"secagg+ {stage}")
                failure["reason"] = f"secagg+ {stage}: {failure['reason']}"
                log.failures.append(failure)
                continue
            if VERIFY_RECORD in reply.content.array_records:  # measurement-only, not protocol bytes
                record = reply.content.array_records[VERIFY_RECORD]
                state.verify_bytes_up += record.count_bytes()
                state.plaintext[coop] = [record[k].numpy() for k in record]
                del reply.content[VERIFY_RECORD]
            state.bytes[stage]["up"] += content_bytes(reply.content)
            if stage == Stage.COLLECT_MASKED_VECTORS:
                log.participants.append(coop)
                fitres_metrics = reply.content.config_records.get("fitres.metrics", {})
                log.client_train[coop] = {k: v for k, v in fitres_metrics.items()
                                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
                state.num_examples[coop] = int(reply.content.metric_records["fitres.num_examples"]["num_examples"])
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _SampledFedAvg(FedAvg):
    """Legacy FedAvg whose cohort is fedgov's seeded sample and whose aggregate keeps the model's dtypes."""

    def __init__(self, *, tracker: _Tracker, cfg: Config, templates: Sequence[np.ndarray],
                 initial_parameters: Parameters) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_evaluate_clients=0,
                         min_available_clients=2, initial_parameters=initial_parameters,
                         fit_metrics_aggregation_fn=lambda _: {})
        self.tracker = tracker
        self.cfg = cfg
        self.templates = list(templates)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        tracker, cfg = self.tracker, self.cfg
        server_round += tracker.round_offset
        state = tracker.current
        assert state is not None and state.log.round == server_round
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        instructions = []
        for coop in state.log.sampled:
            config: dict[str, Any] = {"server-round": server_round,
                                      SEED_KEY: int(np.random.SeedSequence([cfg.seed, server_round, coop])
                                                    .generate_state(1)[0])}
            if cfg.strategy.name == "fedprox":
                config["proximal-mu"] = cfg.strategy.proximal_mu
            instructions.append((proxies[tracker.cooperative_to_node[coop]], FitIns(parameters, config)))
        return instructions

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list:
        return []  # fedgov evaluates with its own Message-API EVALUATE messages

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        aggregate = parameters_to_ndarrays(parameters)
        state = self.tracker.current
        assert state is not None
        state.aggregate = aggregate
        cast = [np.asarray(a, dtype=t.dtype).reshape(t.shape) for a, t in zip(aggregate, self.templates, strict=True)]
        return ndarrays_to_parameters(cast), metrics


class _MeasuredSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with each stage timed and its messages labelled for byte counting.

    Each round it first draws fedgov's seeded cohort and sets ``max_weight`` to the
    largest training set in it, so that every weight is at most 1 and the largest is 1.
    """

    def __init__(self, *args: Any, tracker: _Tracker, sampler: CohortSampler, num_train: Mapping[int, int],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker = tracker
        self.sampler = sampler
        self.num_train = dict(num_train)

    def _timed(self, stage: str, run: Callable[..., bool], grid: Any, context: Any, state: Any) -> bool:
        tracker = self.tracker
        current = tracker.current
        assert current is not None
        tracker.stage = stage
        started = time.perf_counter()
        try:
            ok = run(grid, context, state)
        finally:
            current.seconds[stage] = time.perf_counter() - started
            tracker.stage = None
        current.num_shares, current.threshold = int(state.num_shares), int(state.threshold)
        if not ok:
            current.halted_at = stage
        return ok

    def setup_stage(self, grid, context, state):  # noqa: ANN001, ANN201
        return self._timed(Stage.SETUP, super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state):  # noqa: ANN001, ANN201
        return self._timed(Stage.SHARE_KEYS, super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):  # noqa: ANN001, ANN201
        return self._timed(Stage.COLLECT_MASKED_VECTORS, super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid, context, state):  # noqa: ANN001, ANN201
        return self._timed(Stage.UNMASK, super().unmask_stage, grid, context, state)

    def __call__(self, grid: Any, context: Any) -> None:
        from ..strategies.recorder import RoundLog

        started = time.perf_counter()
        tracker = self.tracker
        server_round = tracker.round_offset + int(
            context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        sampled = self.sampler.sample(server_round, tracker.cooperative_to_node)
        self.max_weight = float(max(self.num_train[c] for c in sampled))
        tracker.current = _RoundState(log=RoundLog(round=server_round, sampled=sampled, started=started),
                                      max_weight=self.max_weight)
        super().__call__(grid, context)


def _verification(state: _RoundState, *, cfg: Config) -> dict[str, Any]:
    """Errors of the SecAgg+ aggregate against plaintext FedAvg of the leaked (verify-only) updates."""
    s = cfg.secure
    coops = [c for c in state.log.participants if c in state.plaintext]
    if state.aggregate is None or not coops or len(coops) != len(state.log.participants):
        return {"max_abs_error": None, "error_bound": None, "max_abs_error_vs_fedavg": None}
    weights = {c: _effective_weight(state.num_examples[c], state.max_weight, s.secagg_quantization_range)
               for c in coops}
    weight_sum = sum(weights.values())
    n_sum = sum(state.num_examples[c] for c in coops)
    err = err_fedavg = 0.0
    clipped = 0
    for layer, agg in enumerate(state.aggregate):
        weighted = [weights[c] * np.asarray(state.plaintext[c][layer], dtype=np.float64) for c in coops]
        clipped += sum(int(np.count_nonzero(np.abs(w) > s.secagg_clip_range)) for w in weighted)
        same_clipped = sum(np.clip(w, -s.secagg_clip_range, s.secagg_clip_range) for w in weighted) / weight_sum
        fedavg = sum(state.num_examples[c] * np.asarray(state.plaintext[c][layer], dtype=np.float64)
                     for c in coops) / n_sum
        agg = np.asarray(agg, dtype=np.float64).reshape(same_clipped.shape)
        err = max(err, float(np.max(np.abs(agg - same_clipped), initial=0.0)))
        err_fedavg = max(err_fedavg, float(np.max(np.abs(agg - fedavg), initial=0.0)))
    return {
        "max_abs_error": err,
        "error_bound": error_bound(num_clients=len(coops), clip_range=s.secagg_clip_range,
                                   quantization_range=s.secagg_quantization_range, weight_sum=weight_sum),
        "max_abs_error_vs_fedavg": err_fedavg,
        "clipped_values": clipped,
        "verify_bytes_up": state.verify_bytes_up,
    }


def _named(parameters: Parameters, names: Sequence[str], templates: Sequence[np.ndarray]) -> ArrayRecord:
    arrays = parameters_to_ndarrays(parameters)
    return ArrayRecord(OrderedDict(
        (name, Array(np.ascontiguousarray(np.asarray(a, dtype=t.dtype).reshape(t.shape))))
        for name, a, t in zip(names, arrays, templates, strict=True)))


def run_secagg_rounds(grid: Grid, cfg: Config, *, initial_arrays: ArrayRecord, node_to_cooperative: Mapping[int, int],
                      sampler: CohortSampler, record: RoundRecord,
                      evaluate_fn: Callable[[ArrayRecord], tuple[float, float]], round_offset: int = 0,
                      on_round: Callable[[dict[str, Any]], None] | None = None) -> ArrayRecord:
    """Train ``cfg.train.rounds - round_offset`` rounds of FedAvg with Flower's SecAgg+; return the model.

    Each round: Flower's ``SecAggPlusWorkflow`` (the four stages, see the module
    docstring) over fedgov's seeded cohort, then fedgov's per-cooperative evaluation
    (Message-API EVALUATE messages, answered by the ClientApp's evaluate handler), the
    central evaluation ``evaluate_fn(arrays) -> (accuracy, loss)``, a ``RoundLog`` passed
    to ``record.add_round`` and a checkpoint, as in plaintext runs.
    """
    s = cfg.secure
    num_rounds = cfg.train.rounds - round_offset
    if num_rounds <= 0:
        return initial_arrays
    cohort = cohort_size(sampler.fraction, len(node_to_cooperative), sampler.count)
    # The config checks this already, except for natural partitions, whose size only the data knows.
    problem = secagg_cohort_problem(s, cohort)
    if problem:
        raise RuntimeError(problem)
    names = list(initial_arrays.keys())
    templates = [initial_arrays[name].numpy() for name in names]
    num_train = {int(c): int(stats["num_train"]) for c, stats in record.cooperatives.items()}

    tracker = _Tracker(node_to_cooperative, round_offset)
    strategy = _SampledFedAvg(tracker=tracker, cfg=cfg, templates=templates,
                              initial_parameters=ndarrays_to_parameters(templates))
    fit_workflow = _MeasuredSecAggPlus(
        num_shares=s.secagg_num_shares, reconstruction_threshold=s.secagg_threshold,
        clipping_range=s.secagg_clip_range, quantization_range=s.secagg_quantization_range,
        modulus_range=MODULUS_RANGE, timeout=cfg.runtime.round_timeout, tracker=tracker, sampler=sampler,
        num_train=num_train)
    latest = {"arrays": initial_arrays}

    def evaluate_and_record(_grid: Any, context: LegacyContext) -> None:
        state = tracker.current
        assert state is not None
        log = state.log
        if state.halted_at is not None:
            log.participants = []  # no aggregate this round: the global model is unchanged
            log.failures.append({"cooperative": -1, "reason": f"secagg+ halted at the {state.halted_at} stage: "
                                                               f"too few cooperatives left to reconstruct the masks"})
        arrays = _named(compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD],
                                                         keep_input=True), names, templates)
        latest["arrays"] = arrays
        started = time.perf_counter()
        config = ConfigRecord({"server-round": log.round})
        evaluating = evaluates_cooperatives(log.round, last_round=cfg.train.rounds, every=evaluation_interval(
            cfg.train.evaluate_every, len(tracker.node_to_cooperative)))
        messages = [Message(content=RecordDict({"arrays": arrays, "config": config}), message_type=MessageType.EVALUATE,
                            dst_node_id=node, group_id=str(log.round))
                    for node in sorted(tracker.node_to_cooperative) if evaluating]
        for reply in grid.send_and_receive(messages, timeout=cfg.runtime.round_timeout):
            if not reply.has_error():
                coop = tracker.cooperative(reply.metadata.src_node_id)
                log.client_eval[coop] = {k: v for r in reply.content.metric_records.values() for k, v in r.items()
                                         if isinstance(v, (int, float))}
        log.client_eval = dict(sorted(log.client_eval.items()))
        log.seconds_evaluate = time.perf_counter() - started
        accuracy, loss = evaluate_fn(arrays)

        log.seconds_train = state.seconds[Stage.COLLECT_MASKED_VECTORS]
        log.seconds_aggregate = state.seconds[Stage.UNMASK]
        if hasattr(grid, "take"):  # a TrafficMeter: all four stages and the evaluation, counted alike
            log.bytes_by_stage, log.messages_by_stage = grid.take()
            log.bytes_up = sum(b["up"] for b in log.bytes_by_stage.values())
            log.bytes_down = sum(b["down"] for b in log.bytes_by_stage.values())
        else:
            log.bytes_up = sum(b["up"] for b in state.bytes.values())
            log.bytes_down = sum(b["down"] for b in state.bytes.values())
        log.extra_phase_seconds = {f"secagg_{stage}": state.seconds[stage] for stage in STAGES}
        block: dict[str, Any] = {"bytes": state.bytes, "num_shares": state.num_shares, "threshold": state.threshold,
                                 "max_weight": state.max_weight, "halted_at": state.halted_at}
        if s.verify:
            block.update(_verification(state, cfg=cfg))
        log.extra = {"secure_aggregation": block}
        if state.halted_at is None:  # the weights applied inside the mask, as the aggregator knows them
            applied = {c: _effective_weight(state.num_examples[c], state.max_weight, s.secagg_quantization_range)
                       for c in log.participants if c in state.num_examples}
            total = sum(applied.values())
            log.weights = {c: w / total for c, w in applied.items()} if total > 0 else {}
        row = record.add_round(log, accuracy=accuracy, loss=loss, arrays=arrays)
        record.save_checkpoint(arrays)
        tracker.current = None
        if on_round is not None:
            on_round(row)

    root = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(root, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=fit_workflow, evaluate_workflow=evaluate_and_record)
    workflow(_CountingGrid(grid, tracker), context)
    return latest["arrays"]


def summary_block(cfg: Config, rows: Sequence[Mapping[str, Any]], *, num_parameters: int) -> dict[str, Any]:
    """The ``secure_aggregation`` block of summary.json for a SecAgg+ run (from metrics.jsonl rows)."""
    s = cfg.secure
    blocks = [r.get("secure_aggregation", {}) for r in rows]
    by_stage = {stage: {d: sum(b.get("bytes", {}).get(stage, {}).get(d, 0) for b in blocks) for d in ("up", "down")}
                for stage in STAGES}
    seconds = {stage: sum(r.get("phase_seconds", {}).get(f"secagg_{stage}", 0.0) for r in rows) for stage in STAGES}
    uploads = sum(r["participants"] for r in rows) * num_parameters
    downloads = sum(len(r["sampled"]) for r in rows) * num_parameters
    up, down = sum(r["bytes_up"] for r in rows), sum(r["bytes_down"] for r in rows)
    out: dict[str, Any] = {
        "scheme": "secagg+",
        "num_shares": s.secagg_num_shares,
        "threshold": s.secagg_threshold,
        "clip_range": s.secagg_clip_range,
        "quantization_range": s.secagg_quantization_range,
        "modulus_range": MODULUS_RANGE,
        "quantization_step": 2 * s.secagg_clip_range / s.secagg_quantization_range,
        "weighting": "num_examples, inside the mask (rounded to 1/quantization_range of num_examples/max_weight)",
        # Per parameter, per cooperative and round, all four stages: up per cooperative that
        # sent a masked vector, down per sampled cooperative.
        "bytes_per_parameter": {"up": up / uploads if uploads else None,
                                "down": down / downloads if downloads else None},
        "bytes_by_stage": by_stage,
        "seconds_by_stage": seconds,
        "halted_rounds": [r["round"] for r, b in zip(rows, blocks) if b.get("halted_at")],
        "verify": s.verify,
    }
    if s.verify:
        errors = [b["max_abs_error"] for b in blocks if b.get("max_abs_error") is not None]
        bounds = [b["error_bound"] for b in blocks if b.get("error_bound") is not None]
        vs_fedavg = [b["max_abs_error_vs_fedavg"] for b in blocks if b.get("max_abs_error_vs_fedavg") is not None]
        out.update({
            "max_abs_error": max(errors, default=None),
            "error_bound": max(bounds, default=None),
            "max_abs_error_vs_fedavg": max(vs_fedavg, default=None),
            "clipped_values": sum(b.get("clipped_values", 0) for b in blocks),
            "verify_bytes_up": sum(b.get("verify_bytes_up", 0) for b in blocks),
            "verify_note": "measurement only: cooperatives also sent their unmasked parameters",
        })
    return out
