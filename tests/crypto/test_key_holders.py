"""Who can decrypt: the aggregator's process holds no secret key; key holders release sums only, once a round."""

from __future__ import annotations

import gc
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fedgov.config import Config
from fedgov.crypto import SecretKeys, encrypt_update
from fedgov.crypto.key_holder import DecryptRefused, KeyHolder
from fedgov.crypto.keys import (AGGREGATOR_CONTEXT, BOARD_DIR, CHECK_KEY, COOPERATIVE_KEYS, CUSTODIAN_KEYS,
                                load_check_key, provision)
from fedgov.results import read_jsonl

SECRET_FILES = (COOPERATIVE_KEYS, CUSTODIAN_KEYS)
SECRET_NAMES = (*SECRET_FILES, CHECK_KEY)


def _secret_windows(key_dir: Path, *, width: int = 48, count: int = 24) -> list[bytes]:
    """Byte strings that occur in the secret key file but not in the public context: its secret part."""
    secret = next((key_dir / name).read_bytes() for name in SECRET_FILES if (key_dir / name).is_file())
    public = (key_dir / AGGREGATOR_CONTEXT).read_bytes()
    windows = []
    for start in np.linspace(0, len(secret) - width, 400).astype(int):
        window = secret[start:start + width]
        if window not in public and len(set(window)) > 8:
            windows.append(window)
    assert len(windows) >= count, "the secret key file should differ from the public context"
    return windows[:: max(1, len(windows) // count)]


def _reachable(roots: list[object], limit: int = 3_000_000) -> list[object]:
    """Every object reachable from ``roots`` through references, not descending into modules, classes
    or code (those lead to the whole interpreter, the test's own variables included)."""
    leaves = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
              types.FrameType)
    seen: set[int] = set()
    found: list[object] = []
    stack = list(roots)
    while stack and len(found) < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, leaves):
            continue
        stack.extend(gc.get_referents(obj))
        if isinstance(obj, (list, tuple, set, frozenset, dict)) is False and hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    assert len(found) < limit, "walk did not finish"
    return found


def _holds_secret(obj: object, windows: list[bytes]) -> str | None:
    import tenseal
    from tenseal import sealapi

    if isinstance(obj, (bytes, bytearray, memoryview)) or (isinstance(obj, np.ndarray) and obj.dtype == np.uint8):
        data = bytes(obj) if not isinstance(obj, np.ndarray) else obj.tobytes()
        if any(w in data for w in windows):
            return f"{type(obj).__name__} of {len(data)} bytes holding secret-key bytes"
    if isinstance(obj, tenseal.Context) and obj.is_private():
        return "a TenSEAL context with a secret key"
    if isinstance(obj, (sealapi.SecretKey, sealapi.Decryptor)):
        return f"a SEAL {type(obj).__name__}"
    is_private = getattr(obj, "is_private", None)
    if callable(is_private) and not isinstance(obj, type):
        try:
            if is_private():
                return f"{type(obj).__name__} with a secret key"
        except TypeError:
            pass
    return None


@pytest.mark.slow
@pytest.mark.parametrize("key_holder", ["clients", "custodian"])
def test_the_aggregators_process_holds_no_secret_key(tmp_path, monkeypatch, key_holder):
    """A real HE run in this process: the ServerApp's strategy and grid reach no secret, and no file
    this process opened while the federation ran holds one."""
    from fedgov import simulate as simulate_module
    from fedgov.strategies import RoundRecorder

    key_dir = provision(tmp_path / "keys", preset="standard", key_holder=key_holder)
    windows = [*_secret_windows(key_dir), (key_dir / CHECK_KEY).read_bytes()]  # the check key: 32 bytes
    cfg = Config().replace(**{"secure.aggregation": "he", "secure.key_holder": key_holder,
                              "secure.key_dir": str(key_dir), "data.num_cooperatives": 4, "data.partition": "iid",
                              "train.rounds": 2, "runtime.out": str(tmp_path / "runs")})

    captured: dict[str, object] = {}
    original_start = RoundRecorder.start

    def spying_start(self, grid, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        captured.update(strategy=self, grid=grid)
        return original_start(self, grid, *args, **kwargs)

    monkeypatch.setattr(RoundRecorder, "start", spying_start)
    opened: list[str] = []
    recording = {"on": False}

    def audit(event: str, args: tuple) -> None:
        if recording["on"] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # cannot be removed; it records only while recording["on"]
    recording["on"] = True
    try:
        run_dir = tmp_path / "runs" / "run"
        simulate_module.simulate(cfg, run_dir, show_progress=False)
        reachable = _reachable([captured["strategy"], captured["grid"]])
    finally:
        recording["on"] = False

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and all(not r["failures"] for r in rows)
    assert all(r["phase_seconds"]["decrypt"] > 0 for r in rows)  # the key holder really decrypted
    # The walk reached the aggregator's state: the HE wrapper and the public context it sums with.
    from fedgov.crypto import PublicContext
    from fedgov.strategies.secure_he import HESecureAggregation

    assert any(isinstance(o, HESecureAggregation) for o in reachable)
    assert any(isinstance(o, PublicContext) for o in reachable)
    problems = {p for obj in reachable if (p := _holds_secret(obj, windows))}
    assert not problems, problems
    secret_paths = {str(key_dir / name) for name in SECRET_NAMES} | {str(p) for p in (key_dir / BOARD_DIR).iterdir()}
    assert not secret_paths & {str(Path(p).resolve()) for p in opened}, sorted(secret_paths & set(opened))
    for path in set(opened):
        if Path(path).is_file() and Path(path).stat().st_size < 50_000_000:
            data = Path(path).read_bytes()
            assert not any(w in data for w in windows), f"{path} holds secret-key bytes"
    # The detector itself finds a secret where there is one.
    keys = SecretKeys.from_bytes((key_dir / next(n for n in SECRET_FILES if (key_dir / n).is_file())).read_bytes())
    assert any(_holds_secret(obj, windows) for obj in _reachable([{"keys": keys, "raw": keys.to_bytes()}]))


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("keys"), preset="standard", key_holder="clients")


def _sum_of(key_dir, values: list[float], *, server_round: int = 1):
    from fedgov.crypto import CheckStamp, aggregate

    keys = SecretKeys.from_bytes((key_dir / COOPERATIVE_KEYS).read_bytes())
    updates = [encrypt_update([np.full(6, v)], context=keys, weight=0.5,
                              check=CheckStamp(load_check_key(key_dir), server_round, coop))
               for coop, v in enumerate(values)]
    return keys, aggregate(updates, context=keys.public_context())


def test_a_key_holder_decrypts_a_sum_once_per_round(key_dir):
    keys, total = _sum_of(key_dir, [1.0, 3.0])
    holder = KeyHolder(keys, load_check_key(key_dir))
    (mean,) = holder.decrypt(total, server_round=1, contributors=[0, 1])
    assert np.allclose(mean, 2.0, atol=1e-5)  # weights 0.5 each: (0.5 + 1.5) / 1
    with pytest.raises(DecryptRefused, match="already decrypted"):
        holder.decrypt(total, server_round=1, contributors=[0, 1])
    with pytest.raises(DecryptRefused, match="at least 2 distinct"):
        holder.decrypt(total, server_round=2, contributors=[0])
    with pytest.raises(DecryptRefused, match="at least 2 distinct"):
        holder.decrypt(total, server_round=3, contributors=[0, 0])
    assert holder.decrypted_rounds == {1}
