"""Homomorphic encryption of model updates (fedgov.crypto): precision, size, keys, hostile bytes."""

import dataclasses
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fedgov.crypto import (
    DEFAULT_PRESET,
    PRESETS,
    SECURITY_128_MAX_COEFF_BITS,
    EncryptedUpdate,
    HEError,
    HEPreset,
    PublicContext,
    SecretKeys,
    aggregate,
    bytes_per_param,
    check_security,
    decrypt_aggregate,
    encrypt_update,
    generate_keys,
    get_preset,
    load_or_generate_keys,
)
from fedgov.bench.he_reference import max_abs_error, plaintext_fedavg
from fedgov.crypto.packing import chunk_ranges, flatten, pack_digits, unflatten, unpack_digits

SRC = Path(__file__).resolve().parents[2] / "src" / "fedgov"

# Layers straddle ciphertext boundaries (4096 standard values, 12288 compact values),
# and the total (13209) is neither a multiple of the slot count nor even.
SHAPES = [(37, 111), (5000,), (3,), (2, 2049), (1,)]
# A realistic ~1e5-parameter model: an MLP 64-1280-64-10 plus GroupNorm-like vectors.
MODEL_SHAPES = [(1280, 64), (1280,), (64, 1280), (64,), (10, 64), (10,), (64,), (64,)]


def _clients(shapes, k, seed, scale=0.1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [[rng.normal(0.0, scale, s).astype(dtype) for s in shapes] for _ in range(k)]


@pytest.fixture(scope="module")
def keys():
    """One key set per (preset, mode), generated once for the module."""
    cache = {}

    def get(preset, mode):
        if (preset, mode) not in cache:
            cache[preset, mode] = generate_keys(preset, mode=mode)
        return cache[preset, mode]

    return get


def _encrypting_context(k: SecretKeys):
    # clients mode: the cooperatives hold the shared secret keys; custodian mode: only the public context
    return k if k.mode == "clients" else PublicContext.from_bytes(k.public_context().to_bytes())


def _bound(preset: HEPreset, k: int, total_weight: float) -> float:
    if preset.scheme == "bfv":  # rounding error of each client, in the numerator, over the total weight
        return k * preset.quant_step / 2 / total_weight + 1e-7  # + float32 output rounding
    return preset.precision


# ---------------------------------------------------------------------------------
# Presets and security
# ---------------------------------------------------------------------------------

def test_presets_are_named_and_the_default_exists():
    assert {"standard", "flare", "compact"} <= set(PRESETS)
    assert DEFAULT_PRESET == "standard" and get_preset(DEFAULT_PRESET) is PRESETS["standard"]
    for name, p in PRESETS.items():
        assert p.name == name and p.description and p.precision > 0
    flare = PRESETS["flare"]
    assert (flare.scheme, flare.poly_modulus_degree, flare.coeff_mod_bit_sizes, flare.scale_bits, flare.packing) == (
        "ckks", 8192, (60, 40, 40), 40, "per-layer")
    with pytest.raises(HEError, match=r"secure\.preset.*'nope'.*compact, flare, standard"):
        get_preset("nope")


def test_security_table_and_every_preset_within_128_bits():
    # HomomorphicEncryption.org standard, 128-bit classical security, ternary secret
    assert SECURITY_128_MAX_COEFF_BITS[4096] == 109
    assert SECURITY_128_MAX_COEFF_BITS[8192] == 218
    assert SECURITY_128_MAX_COEFF_BITS[16384] == 438
    for p in PRESETS.values():
        assert p.total_coeff_bits <= SECURITY_128_MAX_COEFF_BITS[p.poly_modulus_degree], p.name
        check_security(p)
    too_big = dataclasses.replace(PRESETS["compact"], name="too-big", coeff_mod_bit_sizes=(60, 50))
    with pytest.raises(HEError, match="exceeds the 128-bit bound of 109 bits"):
        check_security(too_big)
    with pytest.raises(HEError):
        generate_keys(too_big)
    # SEAL, under TenSEAL, enforces the same table
    with pytest.raises(ValueError):
        ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 50])


def test_compact_plain_modulus_is_batching_prime_without_overflow():
    p = PRESETS["compact"]
    t, two_n = p.plain_modulus, 2 * p.poly_modulus_degree
    assert t % two_n == 1
    assert all(t % d for d in range(3, 20_000, 2))  # cheap partial primality check; full check in the preset
    # the largest packed slot (every digit at its bound) stays below t/2, so sums never wrap modulo t
    base, bound = p.digit_base, p.field_bound
    assert 2 * sum(bound * base**i for i in range(p.values_per_slot)) < t
    # max_clients updates with weights summing to 1 fit each digit: R/step + K/2 <= bound
    assert p.clip_range / p.quant_step + p.max_clients / 2 <= bound + 1e-6


# ---------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------

def test_dense_packing_uses_every_slot_across_layers():
    flat, specs = flatten([np.zeros((3, 5), np.float32), np.ones(7), np.zeros(0), np.arange(4, dtype=np.int64)])
    assert flat.dtype == np.float64 and flat.size == 26
    assert chunk_ranges(specs, 10) == [(0, 10), (10, 20), (20, 26)]
    assert chunk_ranges(specs, 10, per_layer=True) == [(0, 10), (10, 15), (15, 22), (22, 26)]
    back = unflatten(flat, specs)
    assert [a.shape for a in back] == [(3, 5), (7,), (0,), (4,)]
    assert [a.dtype for a in back] == [np.float32, np.float64, np.float64, np.int64]


def test_digit_packing_round_trips_sums():
    rng = np.random.default_rng(0)
    base, k = 1 << 21, 2
    parts = [rng.integers(-50_000, 50_000, 1001) for _ in range(10)]
    total = sum(pack_digits(p, base, k) for p in parts)
    np.testing.assert_array_equal(unpack_digits(total, base, k, 1001), sum(parts))


# ---------------------------------------------------------------------------------
# HE aggregate == plaintext FedAvg
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["clients", "custodian"])
@pytest.mark.parametrize("preset", ["standard", "flare", "compact"])
def test_he_aggregate_matches_plaintext_fedavg(preset, mode, keys):
    k = keys(preset, mode)
    p = k.preset
    clients = _clients(SHAPES, 5, seed=1)
    n_k = np.array([120, 7, 900, 33, 410])
    weights = n_k / n_k.sum()  # unequal, fractional FedAvg weights
    enc = _encrypting_context(k)
    updates = [encrypt_update(c, context=enc, weight=w, workers=1).to_bytes() for c, w in zip(clients, weights)]
    agg = aggregate(updates, context=k.public_context())
    assert agg.contributors == 5 and math.isclose(agg.weight, 1.0)
    out = decrypt_aggregate(agg.to_bytes(), keys=k, shapes=SHAPES)
    ref = plaintext_fedavg(clients, weights)
    assert [a.shape for a in out] == SHAPES and all(a.dtype == np.float32 for a in out)
    err = max_abs_error(out, ref)
    assert err <= _bound(p, 5, 1.0), (preset, mode, err)
    assert err <= p.precision


def test_unnormalized_weights_and_explicit_total(keys):
    # CKKS presets accept any positive weights; the decrypting party divides by their sum
    k = keys("standard", "clients")
    clients = _clients(SHAPES, 3, seed=2)
    weights = [3.0, 1.0, 0.5]
    ups = [encrypt_update(c, context=k, weight=w, workers=1) for c, w in zip(clients, weights)]
    agg = aggregate(ups, context=k.public_context())
    ref = plaintext_fedavg(clients, weights)
    assert max_abs_error(decrypt_aggregate(agg, keys=k), ref) <= 1e-6
    assert max_abs_error(decrypt_aggregate(agg, keys=k, total_weight=4.5), ref) <= 1e-6


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a silent fall-back to one process would fail here
@pytest.mark.parametrize(("preset", "mode"), [("standard", "clients"), ("standard", "custodian"),
                                              ("compact", "clients")])
def test_parallel_encryption_matches(keys, preset, mode):
    k = keys(preset, mode)
    enc = k if mode == "clients" else k.public_context()
    x = _clients([(40_000,), (9,)], 1, seed=3)[0]
    par = encrypt_update(x, context=enc, weight=0.5, workers=2)
    from fedgov.crypto import he_workers

    assert he_workers._POOL is not None and not he_workers._POOL_BROKEN  # a worker process did encrypt
    assert par.num_chunks == -(-40_009 // k.preset.data_values_per_ciphertext) >= 4
    one = encrypt_update(x, context=enc, weight=0.5, workers=1)
    assert par.num_bytes == pytest.approx(one.num_bytes, rel=0.01)  # same layout, zstd sizes vary a little
    assert max_abs_error(decrypt_aggregate(par, keys=k), x) <= k.preset.precision


# ---------------------------------------------------------------------------------
# Size on the wire
# ---------------------------------------------------------------------------------

def test_bytes_per_param(keys):
    x = _clients(MODEL_SHAPES, 1, seed=4)[0]
    n = sum(a.size for a in x)
    assert 100_000 <= n <= 200_000
    bpp = {}
    for name in ("standard", "flare", "compact"):
        k = keys(name, "clients")
        upd = encrypt_update(x, context=k, weight=0.1, workers=1)
        data = upd.to_bytes()
        assert upd.num_params == n and upd.num_bytes == len(data)
        bpp[name] = bytes_per_param(data)
        assert bpp[name] == pytest.approx(len(data) / n)
        assert bpp[name] <= k.preset.max_bytes_per_param, (name, bpp[name])
    assert bpp["standard"] <= 8.0  # seeded: symmetric keys
    assert bpp["compact"] <= 12.0
    assert bpp["standard"] <= 0.6 * bpp["flare"], bpp


def test_standard_carries_two_values_per_complex_slot(keys):
    # TenSEAL's CKKSVector fills only the real parts; standard uses the imaginary parts
    # too, so one ciphertext holds N values and each value costs half the bytes.
    k = keys("standard", "clients")
    n = k.preset.poly_modulus_degree
    assert k.preset.values_per_ciphertext == n
    n = k.preset.data_values_per_ciphertext  # all but the check slots (fedgov.crypto.he_check)
    assert n == k.preset.values_per_ciphertext - k.preset.check_values
    x = [np.linspace(-1.0, 1.0, n)]
    upd = encrypt_update(x, context=k, weight=0.5, workers=1)
    assert upd.num_chunks == 1
    real_only = ts.ckks_vector(k.tenseal_context, x[0][: n // 2].tolist()).serialize()
    per_value = len(upd.chunk_bytes()[0]) / n
    assert per_value <= 0.55 * len(real_only) / (n // 2)
    assert max_abs_error(decrypt_aggregate(upd, keys=k), x) <= 1e-6


def test_symmetric_standard_ciphertexts_travel_seeded(keys):
    # Symmetric encryption sends the random half of each ciphertext as its seed; the
    # aggregator's keyless context regrows it while loading, and the sum decrypts.
    sym, pub = keys("standard", "clients"), keys("standard", "custodian")
    x = [np.linspace(-1.0, 1.0, sym.preset.data_values_per_ciphertext)]
    seeded = encrypt_update(x, context=sym, weight=0.5, workers=1)
    full = encrypt_update(x, context=pub.public_context(), weight=0.5, workers=1)  # public key: no seed
    assert len(seeded.chunk_bytes()[0]) < 0.55 * len(full.chunk_bytes()[0])
    server = PublicContext.from_bytes(sym.public_context().to_bytes())
    agg = aggregate([seeded, seeded.to_bytes()], context=server)
    assert max_abs_error(decrypt_aggregate(agg, keys=sym), x) <= 1e-6
    assert max_abs_error(decrypt_aggregate(full, keys=pub), x) <= 1e-6


def test_values_near_the_complex_slot_bound(keys):
    # Two values of size B share a slot of modulus up to sqrt(2) B: the bound is divided by sqrt(2).
    k = keys("standard", "clients")
    bound = k.preset.ckks_value_bound
    assert bound == pytest.approx(2.0 ** 13 / 1000 / math.sqrt(2))
    ok = [np.full(64, 0.99 * bound)]
    assert max_abs_error(decrypt_aggregate(encrypt_update(ok, context=k, weight=1.0, workers=1), keys=k), ok) <= 1e-6
    with pytest.raises(HEError, match="above"):
        encrypt_update([np.full(64, 1.01 * bound)], context=k, weight=1.0, workers=1)


def test_bytes_per_param_on_the_default_model(keys):
    # The acceptance numbers are for a run: the default 8,970-parameter MLP, whose
    # last ciphertext is partly empty. The ring sizes keep that padding small.
    from fedgov.config import Config
    from fedgov.models import build_model

    cfg = Config()
    model = build_model(cfg.model.name, input_shape=(64,), num_classes=10, hidden=cfg.model.hidden)
    x = [p.detach().numpy() for p in model.parameters()]
    assert sum(a.size for a in x) == 8970
    bpp = {name: bytes_per_param(encrypt_update(x, context=keys(name, "clients"), weight=0.1, workers=1).to_bytes())
           for name in ("standard", "compact")}
    assert bpp["standard"] <= 34.0 and bpp["compact"] <= 12.0, bpp


# ---------------------------------------------------------------------------------
# Who can decrypt
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["clients", "custodian"])
def test_aggregator_context_is_public_and_cannot_decrypt(mode, keys):
    k = keys("standard", mode)
    server = PublicContext.from_bytes(k.public_context().to_bytes())  # what the aggregator receives
    assert k.is_private() and not server.is_private()
    assert not server.tenseal_context.is_private()
    x = _clients([(5000,)], 1, seed=5)[0]
    agg = aggregate([encrypt_update(x, context=_encrypting_context(k), weight=1.0, workers=1)], context=server)
    with pytest.raises(HEError, match="needs SecretKeys"):
        decrypt_aggregate(agg, keys=server)
    # ... and not by going around fedgov either: TenSEAL itself has no key to decrypt with
    chunk = agg.chunk_bytes()[0]
    vec = ts.ckks_vector_from(server.tenseal_context, chunk)
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    with pytest.raises(HEError):
        SecretKeys.from_bytes(server.to_bytes())
    # the secret keys do decrypt it
    assert max_abs_error(decrypt_aggregate(agg, keys=SecretKeys.from_bytes(k.to_bytes())), x) <= 1e-6


def test_custodian_mode_cooperatives_hold_only_a_public_context(keys):
    k = keys("compact", "custodian")
    coop = PublicContext.from_bytes(k.public_context().to_bytes())
    assert not coop.is_private() and coop.can_encrypt
    upd = encrypt_update(_clients([(100,)], 1, seed=6)[0], context=coop, weight=1.0, workers=1)
    with pytest.raises(HEError):
        decrypt_aggregate(upd, keys=coop)
    decrypt_aggregate(upd, keys=k)


def test_clients_mode_public_context_cannot_encrypt(keys):
    k = keys("standard", "clients")
    with pytest.raises(HEError, match="no public key"):
        encrypt_update([np.zeros(10)], context=k.public_context(), weight=1.0)


def test_a_public_context_blob_must_not_carry_a_secret_key(keys):
    k = keys("standard", "custodian")
    secret_blob = k.to_bytes()
    forged = secret_blob[:5] + b"\x00" + secret_blob[6:]  # kind byte says "public"
    with pytest.raises(HEError, match="must not hold a secret key"):
        PublicContext.from_bytes(forged)


def test_keys_round_trip_and_shared_file(tmp_path, keys):
    k = keys("compact", "clients")
    k2 = SecretKeys.from_bytes(k.to_numpy())
    assert (k2.key_id, k2.preset, k2.mode) == (k.key_id, k.preset, k.mode)
    path = tmp_path / "he" / "keys.bin"
    a = load_or_generate_keys(path, preset="compact", mode="clients")
    b = load_or_generate_keys(path, preset="compact", mode="clients")
    assert a.key_id == b.key_id and path.stat().st_mode & 0o077 == 0
    with pytest.raises(HEError, match="not 'standard'"):
        load_or_generate_keys(path, preset="standard", mode="clients")


# ---------------------------------------------------------------------------------
# Weights, ranges, clipping
# ---------------------------------------------------------------------------------

def test_compact_clips_to_its_range_and_reports_it(keys):
    k = keys("compact", "clients")
    R = k.preset.clip_range
    x = [np.array([0.5, -0.25, 3 * R, -2 * R, R, 0.0], dtype=np.float64)]
    upd = encrypt_update(x, context=k, weight=1.0, workers=1)
    assert upd.num_clipped == 2
    out = decrypt_aggregate(upd, keys=k)[0]
    np.testing.assert_allclose(out, np.clip(x[0], -R, R), atol=k.preset.quant_step)
    assert EncryptedUpdate.from_bytes(upd.to_bytes()).num_clipped is None  # the count is not sent


def test_compact_needs_fractional_weights_summing_to_at_most_one(keys):
    k = keys("compact", "clients")
    x = [np.ones(10)]
    with pytest.raises(HEError, match="fractional weight"):
        encrypt_update(x, context=k, weight=5.0)
    ups = [encrypt_update(x, context=k, weight=0.6, workers=1) for _ in range(2)]
    with pytest.raises(HEError, match="may overflow"):
        aggregate(ups, context=k.public_context())


def test_at_most_max_clients_updates_per_aggregate():
    small = dataclasses.replace(PRESETS["standard"], name="standard-2", max_clients=2)
    k = generate_keys(small)
    ups = [encrypt_update([np.ones(10)], context=k, weight=0.1, workers=1) for _ in range(3)]
    aggregate(ups[:2], context=k.public_context())
    with pytest.raises(HEError, match="at most 2 updates"):
        aggregate(ups, context=k.public_context())


def test_ckks_rejects_values_beyond_its_modulus_headroom(keys):
    k = keys("standard", "clients")
    with pytest.raises(HEError, match="fractional weights"):
        encrypt_update([np.ones(10)], context=k, weight=60_000.0)
    with pytest.raises(HEError, match="NaN"):
        encrypt_update([np.array([np.nan])], context=k, weight=1.0)
    with pytest.raises(HEError, match="weight"):
        encrypt_update([np.ones(3)], context=k, weight=0.0)


def test_integer_arrays_are_averaged_and_rounded(keys):
    k = keys("standard", "clients")
    a = [np.array([2, 4, 7], dtype=np.int64)]
    b = [np.array([4, 8, 7], dtype=np.int64)]
    agg = aggregate([encrypt_update(c, context=k, weight=0.5, workers=1) for c in (a, b)], context=k.public_context())
    out = decrypt_aggregate(agg, keys=k)[0]
    assert out.dtype == np.int64 and out.tolist() == [3, 6, 7]


# ---------------------------------------------------------------------------------
# Hostile or mismatched bytes
# ---------------------------------------------------------------------------------

def _blob(k, shapes=((300,), (5000,)), seed=7):
    return encrypt_update(_clients(list(shapes), 1, seed=seed)[0], context=k, weight=0.5, workers=1).to_bytes()


def _process(data, k):
    """What the aggregator and the key holder do with bytes they receive."""
    agg = aggregate([data], context=k.public_context())
    return decrypt_aggregate(agg.to_bytes(), keys=k)


@pytest.mark.parametrize("preset", ["standard", "compact"])
def test_truncated_and_garbage_bytes_raise_heerror(preset, keys):
    k = keys(preset, "clients")
    good = _blob(k)
    _process(good, k)
    rng = np.random.default_rng(0)
    cuts = sorted({*range(120), len(good) - 1, *rng.integers(0, len(good), 20).tolist()})  # every header byte
    for cut in cuts:
        with pytest.raises(HEError):
            _process(good[:cut], k)
    for size in (0, 1, 16, 1000, 70_000):
        with pytest.raises(HEError):
            _process(rng.integers(0, 256, size, dtype=np.uint8).tobytes(), k)
    with pytest.raises(HEError):
        _process(b"FGHU" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), k)
    with pytest.raises(HEError):
        _process(good + b"\x00", k)
    with pytest.raises(HEError):
        EncryptedUpdate.from_bytes("not bytes")  # type: ignore[arg-type]
    with pytest.raises(HEError):
        EncryptedUpdate.from_bytes(np.zeros((2, 2), dtype=np.float32))
    # flipped bytes anywhere: either still well-formed (a garbage ciphertext is still a ciphertext) or HEError
    for _ in range(60):
        b = bytearray(good)
        for pos in rng.integers(0, len(b), 3):
            b[pos] ^= int(rng.integers(1, 256))
        try:
            _process(bytes(b), k)
        except HEError:
            pass


def test_a_chunk_with_more_ciphertexts_is_rejected_before_tenseal_sees_it(keys):
    # TenSEAL adds vectors without checking their ciphertext counts: such a blob could crash the aggregator
    k = keys("standard", "clients")
    slots = k.preset.slots
    good = EncryptedUpdate.from_bytes(_blob(k, shapes=((slots,),)))  # one full ciphertext
    big = ts.ckks_vector(k.tenseal_context, [0.0] * 2).serialize()  # one ciphertext, wrong size
    ctx = k.tenseal_context
    v = ts.ckks_vector(ctx, [0.5] * (2 * slots))  # two ciphertexts
    for chunk in (big, v.serialize(), b"", b"\x0a\x02\x80\x20\x12\x00"):
        forged = EncryptedUpdate(preset_name=good.preset_name, fingerprint=good.fingerprint, key_id=good.key_id,
                                 specs=good.specs, contributors=1, weight=0.5, chunks=[chunk])
        with pytest.raises(HEError, match="framing|malformed"):
            aggregate([good, forged.to_bytes()], context=k.public_context())


def test_a_header_claiming_huge_shapes_is_rejected_cheaply(keys):
    k = keys("standard", "clients")
    good = EncryptedUpdate.from_bytes(_blob(k, shapes=((4096,),)))
    forged = EncryptedUpdate(preset_name=good.preset_name, fingerprint=good.fingerprint, key_id=good.key_id,
                             specs=[(2, (1 << 39,))], contributors=1, weight=0.5, chunks=good.chunk_bytes())
    with pytest.raises(HEError, match="cannot hold"):
        aggregate([forged.to_bytes()], context=k.public_context())
    with pytest.raises(HEError, match="cannot hold"):
        decrypt_aggregate(forged.to_bytes(), keys=k)


def test_mismatched_keys_presets_and_shapes_raise(keys):
    k = keys("standard", "clients")
    other = generate_keys("standard")
    mine, theirs = _blob(k), _blob(other)
    with pytest.raises(HEError, match="different keys"):
        aggregate([mine, theirs], context=k.public_context())
    with pytest.raises(HEError, match="different keys"):
        decrypt_aggregate(theirs, keys=k)
    with pytest.raises(HEError, match="preset"):
        aggregate([_blob(keys("compact", "clients"))], context=k.public_context())
    with pytest.raises(HEError, match="shapes"):
        aggregate([mine, _blob(k, shapes=((5000,), (300,)))], context=k.public_context())
    with pytest.raises(HEError, match="shapes"):
        decrypt_aggregate(mine, keys=k, shapes=[(1,)])
    with pytest.raises(HEError):
        aggregate([], context=k.public_context())


def test_wire_format_header(keys):
    k = keys("standard", "clients")
    upd = encrypt_update(_clients(SHAPES, 1, seed=8)[0], context=k, weight=0.25, workers=1)
    arr = upd.to_numpy()
    assert arr.dtype == np.uint8 and arr.ndim == 1
    back = EncryptedUpdate.from_bytes(arr)
    assert back.shapes == SHAPES and back.weight == 0.25 and back.contributors == 1
    assert back.preset_name == "standard" and back.key_id == k.key_id
    assert back.num_chunks == -(-sum(math.prod(s) for s in SHAPES) // k.preset.data_values_per_ciphertext)
    data = bytes(arr)
    assert data[:4] == b"FGHU" and data[6] == len("standard")
    (n_chunks,) = struct.unpack_from("<I", data, 7 + 8 + 16 + 16 + sum(2 + 8 * len(s) for s in SHAPES))
    assert n_chunks == back.num_chunks


def test_only_fedgov_crypto_and_the_benchmarks_import_tenseal():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "crypto" or path.relative_to(SRC).parts[0] == "bench":
            continue
        if re.search(r"^\s*(import|from)\s+tenseal", path.read_text(), re.MULTILINE):
            offenders.append(str(path))
    assert offenders == []


def test_importing_fedgov_crypto_or_the_config_does_not_import_tenseal():
    code = ("import sys\n"
            "import fedgov.config, fedgov.crypto, fedgov.crypto.keys\n"
            "from fedgov.crypto import PRESETS, EncryptedUpdate, encrypt_update\n"
            "print('tenseal' in sys.modules)\n"
            "fedgov.crypto.generate_keys('standard')\n"
            "print('tenseal' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]  # imported only when first needed
