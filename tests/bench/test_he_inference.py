"""Encrypted inference (fedgov.bench.he_inference) and its benchmark (fedgov.bench.inference)."""

import json
import math
import struct

import numpy as np
import pytest
import tenseal as ts

from fedgov.bench.core import BenchContext
from fedgov.bench.he_inference import (
    _REQ_HEAD,
    INFERENCE_PRESETS,
    InferenceKeys,
    InferencePreset,
    InferenceServer,
    LinearModel,
    SquareMLP,
    _pack_blobs,
    check_inference_preset,
    get_inference_preset,
    input_layout,
)
from fedgov.bench.inference import (
    load_data,
    run_encrypted_inference,
    train_logreg,
    train_square_mlp,
)
from fedgov.crypto import SECURITY_128_MAX_COEFF_BITS, HEError


@pytest.fixture(scope="module")
def setup():
    """Data, both trained models, one client key set and a server per model (built from bytes)."""
    data = load_data(0)
    models = {"logreg": train_logreg(data), "mlp": train_square_mlp(data)}
    keys = InferenceKeys.generate("inference")
    blob = keys.server_context_bytes()
    servers = {name: InferenceServer(blob, m) for name, m in models.items()}
    return data, models, keys, servers


# ---------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------

def test_inference_preset_is_128_bit_secure_with_depth_two():
    p = get_inference_preset("inference")
    assert p is INFERENCE_PRESETS["inference"]
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits) == (8192, (60, 40, 40, 60), 40)
    assert p.total_coeff_bits <= SECURITY_128_MAX_COEFF_BITS[p.poly_modulus_degree]
    assert p.depth == 2 and p.slots == 4096
    assert "128-bit" in p.description and 0 < p.precision <= 1e-3
    # a third 40-bit level (a separate output layer) would not be 128-bit secure at N=8192
    deeper = InferencePreset("deeper", 8192, (60, 40, 40, 40, 60), 40, precision=1e-4)
    with pytest.raises(HEError, match="exceeds the 128-bit bound"):
        check_inference_preset(deeper)
    with pytest.raises(HEError, match="unknown inference preset"):
        get_inference_preset("nope")
    assert InferencePreset.from_json(p.to_json()) == p
    with pytest.raises(HEError):
        InferencePreset.from_json("{not json")


# ---------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_he_logits_match_plain_and_predictions_agree(setup, name):
    data, models, keys, servers = setup
    model, server = models[name], servers[name]
    precision = keys.preset.precision
    plain = model.logits(data.x_test)
    assert np.mean((plain > 0) == data.y_test) > 0.95  # a useful diagnostic model in the first place
    # the whole test split, batched
    he = keys.decrypt_logits(server.evaluate(keys.encrypt_batch(data.x_test)))
    assert he.shape == plain.shape
    assert np.max(np.abs(he - plain)) <= precision
    assert np.array_equal(he > 0, plain > 0)
    # single samples, one request each
    for i in range(0, len(data.y_test), 23):
        resp = server.evaluate(keys.encrypt_sample(data.x_test[i], server.layout))
        out = keys.decrypt_logits(resp)
        assert out.shape == (1,)
        assert abs(out[0] - plain[i]) <= precision
        assert (out[0] > 0) == (plain[i] > 0)


def test_a_batch_larger_than_one_ciphertext_spans_groups(setup):
    data, models, keys, servers = setup
    x = data.x_test[np.arange(4096 + 37) % len(data.y_test)]
    req = keys.encrypt_batch(x)
    out = keys.decrypt_logits(servers["logreg"].evaluate(req))
    assert out.shape == (len(x),)
    assert np.max(np.abs(out - models["logreg"].logits(x))) <= keys.preset.precision


def test_the_square_mlp_folds_its_output_layer_with_mixed_signs_and_zero_units():
    rng = np.random.default_rng(3)
    w2 = rng.normal(size=8)
    w2[[1, 4]] = 0.0  # dead units
    w2[0] = -abs(w2[0])  # the first unit negative: the sum starts negated
    m = SquareMLP(rng.normal(size=(5, 8)) * 0.4, rng.normal(size=8) * 0.2, w2, -0.7)
    keys = InferenceKeys.generate()
    server = InferenceServer(keys.server_context_bytes(), m)
    assert server.layout == input_layout(m) and server.layout.tiles == 8 and server.layout.stride == 8
    x = rng.normal(size=(20, 5)) * 2
    assert np.max(np.abs(keys.decrypt_logits(server.evaluate(keys.encrypt_batch(x))) - m.logits(x))) <= 1e-4
    for row in x[:3]:
        out = keys.decrypt_logits(server.evaluate(keys.encrypt_sample(row, server.layout)))
        assert abs(out[0] - m.logits(row)) <= 1e-4


# ---------------------------------------------------------------------------------
# Who can decrypt
# ---------------------------------------------------------------------------------

def test_the_server_context_is_public_and_cannot_decrypt(setup):
    data, _, keys, servers = setup
    server = servers["mlp"]
    assert keys.is_private() and not server.is_private()
    assert not server.tenseal_context.is_private()
    assert server.tenseal_context.has_public_key()
    with pytest.raises(ValueError, match="public"):
        server.tenseal_context.secret_key()
    # a ciphertext under the client's keys, loaded where the server holds it: TenSEAL has no key to decrypt with
    vec = ts.ckks_vector_from(server.tenseal_context, ts.ckks_vector(keys.tenseal_context, [1.0, 2.0]).serialize())
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    assert not hasattr(server, "decrypt_logits")
    # other client keys cannot read this client's response either
    resp = server.evaluate(keys.encrypt_sample(data.x_test[0], server.layout))
    with pytest.raises(HEError, match="other keys"):
        InferenceKeys.generate().decrypt_logits(resp)


def test_a_server_context_must_be_public_and_match_its_preset(setup):
    _, models, keys, _ = setup
    good = keys.server_context_bytes()
    for bad in (b"", b"FGIC", good[:200], good[:-10], good + b"x", b"XXXX" + good[4:]):
        with pytest.raises(HEError):
            InferenceServer(bad, models["logreg"])
    # the secret context, framed like a server context, is refused
    secret = keys.tenseal_context.serialize(save_secret_key=True)
    head_len = struct.calcsize("<4sB8sI")
    (plen,) = struct.unpack_from("<I", good, head_len - 4)
    forged = good[:head_len + plen] + struct.pack("<Q", len(secret)) + secret
    with pytest.raises(HEError, match="secret key"):
        InferenceServer(forged, models["logreg"])
    with pytest.raises(HEError, match="model type"):
        InferenceServer(good, object())


# ---------------------------------------------------------------------------------
# Hostile bytes
# ---------------------------------------------------------------------------------

def _request(keys, layout, blobs, *, n=1, d=None, kind=0):
    d = layout.n_features if d is None else d
    head = _REQ_HEAD.pack(b"FGIQ", 1, kind, keys.key_id, n, d, layout.stride, layout.tiles, layout.copies)
    return head + _pack_blobs(blobs)


def test_malformed_requests_raise_heerror(setup):
    data, _, keys, servers = setup
    server, other = servers["mlp"], servers["logreg"]
    x = data.x_test[0]
    good = keys.encrypt_sample(x, server.layout)
    blob = keys._encrypt(server.layout.pack(x))
    cases = [
        b"", b"FGIQ", b"\x00" * 64, good[:10], good[:_REQ_HEAD.size + 2], good[:len(good) // 2], good[:-1],
        good + b"\x00", b"XXXX" + good[4:], np.zeros(3, dtype=np.float32),
        keys.encrypt_sample(x, other.layout),  # packed for the logreg model
        InferenceKeys.generate().encrypt_sample(x, server.layout),  # other keys
        _request(keys, server.layout, []),
        _request(keys, server.layout, [blob, blob]),
        _request(keys, server.layout, [b""]),
        _request(keys, server.layout, [b"garbage"]),
        _request(keys, server.layout, [blob[:-7]]),
        _request(keys, server.layout, [blob], d=29),
        _request(keys, server.layout, [ts.ckks_vector(keys.tenseal_context, [0.5] * 5000).serialize()]),  # 2 cts
        _request(keys, server.layout, [ts.ckks_vector(keys.tenseal_context, server.layout.pack(x).tolist(),
                                                      2.0 ** 30).serialize()]),  # another scale
        _request(keys, server.layout, [blob], n=5000, kind=1),  # a batch of 5000 with one ciphertext
        _request(keys, server.layout, [blob] * 30, n=5, kind=1),  # batch ciphertexts of the wrong size
    ]
    small = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    small.global_scale = 2.0 ** 20
    cases.append(_request(keys, server.layout, [ts.ckks_vector(small, [1.0] * 1024).serialize()]))  # other params
    for bad in cases:
        with pytest.raises(HEError):
            server.evaluate(bad)
    with pytest.raises(HEError, match="shape"):
        keys.encrypt_sample(x[:5], server.layout)
    with pytest.raises(HEError, match="NaN"):
        keys.encrypt_batch(np.full((2, 30), np.nan))


def test_flipped_bytes_never_crash(setup):
    data, _, keys, servers = setup
    server = servers["logreg"]
    good = keys.encrypt_sample(data.x_test[1], server.layout)
    resp = server.evaluate(good)
    rng = np.random.default_rng(0)
    for target, call in ((good, server.evaluate), (resp, keys.decrypt_logits)):
        for pos in list(range(48)) + list(rng.integers(48, len(target), 40)):
            b = bytearray(target)
            b[int(pos)] ^= 1 << int(rng.integers(8))
            try:
                call(bytes(b))  # a flip inside coefficient data can still be a valid ciphertext
            except HEError:
                pass


def test_malformed_responses_raise_heerror(setup):
    data, _, keys, servers = setup
    resp = servers["logreg"].evaluate(keys.encrypt_sample(data.x_test[2], servers["logreg"].layout))
    for bad in (b"", resp[:12], resp[:40], resp[:-3], resp + b"!", b"XXXX" + resp[4:],
                resp[:struct.calcsize("<4sBB8sI")] + _pack_blobs([b"junk"])):
        with pytest.raises(HEError):
            keys.decrypt_logits(bad)


# ---------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------

def test_run_encrypted_inference_tiny_spec(tmp_path):
    steps = []
    ctx = BenchContext(quick=True, device="cpu", out=tmp_path, progress=steps.append)
    rows = run_encrypted_inference({"samples": 4, "batch_size": 8, "batch_repeat": 1, "warmup": 1}, ctx)
    assert [(r["model"], r["mode"]) for r in rows] == [("logreg", "plain"), ("logreg", "he"),
                                                     ("mlp", "plain"), ("mlp", "he")]
    assert steps
    json.dumps(rows)  # flat JSON scalars
    for r in rows:
        assert r["part"] == "inference" and r["n_samples"] == 4 and r["batch_size"] == 8
        assert all(v is None or isinstance(v, (str, int, float, bool)) for v in r.values())
        for key in ("latency_p50_ms", "latency_p99_ms", "latency_mean_ms", "throughput_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["model"], r["mode"], key)
        assert r["latency_p99_ms"] >= r["latency_p50_ms"]
        assert r["request_bytes"] > 0 and r["response_bytes"] > 0
        assert 0.9 <= r["test_accuracy"] <= 1.0
        if r["mode"] == "plain":
            assert r["preset"] is None and r["agreement"] == 1.0 and r["max_abs_logit_error"] == 0.0
        else:
            assert r["preset"] == "inference" and r["agreement"] == 1.0
            assert r["max_abs_logit_error"] <= r["precision"]
            for key in ("encrypt_ms", "evaluate_ms", "decrypt_ms"):
                assert math.isfinite(r[key]) and r[key] > 0
            assert r["request_bytes"] > 100_000 and r["batch_capacity"] == 4096
    he = {r["model"]: r for r in rows if r["mode"] == "he"}
    plain = {r["model"]: r for r in rows if r["mode"] == "plain"}
    for name in he:  # HE costs orders of magnitude more than plaintext inference
        assert he[name]["latency_p50_ms"] > 10 * plain[name]["latency_p50_ms"]
        assert he[name]["test_accuracy"] == plain[name]["test_accuracy"]


def test_linear_model_rejects_bad_weights():
    with pytest.raises(HEError, match="NaN"):
        LinearModel(np.array([1.0, np.nan]), 0.0)
    with pytest.raises(HEError, match="shape"):
        SquareMLP(np.ones((3, 2)), np.ones(3), np.ones(2), 0.0)
    keys = InferenceKeys.generate()
    with pytest.raises(HEError, match="all zero"):
        InferenceServer(keys.server_context_bytes(), LinearModel(np.zeros(4), 1.0))
