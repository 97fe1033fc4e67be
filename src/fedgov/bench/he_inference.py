"""Encrypted inference with CKKS (TenSEAL): a server classifies a sample it never sees.

Roles and keys
--------------
The **client** (data owner, e.g. a hospital) generates :class:`InferenceKeys` and
keeps them: only it can decrypt. It hands the server
:meth:`InferenceKeys.server_context_bytes`: the CKKS parameters with the public,
relinearization and Galois (rotation) keys and no secret key. The **server**
(model owner) builds an :class:`InferenceServer` from those bytes and its own
plaintext model; its context ``is_private()`` is False and it cannot decrypt.

Per request: client :meth:`~InferenceKeys.encrypt_sample` (or
:meth:`~InferenceKeys.encrypt_batch`) -> bytes -> server
:meth:`~InferenceServer.evaluate` -> bytes -> client
:meth:`~InferenceKeys.decrypt_logits`. The client applies the sigmoid (or takes
the sign of the logit) itself.

Models
------
:class:`LinearModel` (logistic regression, ``w.x + b``) and :class:`SquareMLP`
(``w2.(W1 x + b1)^2 + b2``). The second layer is folded into the square, so the
MLP needs multiplicative depth 2, not 3: with ``a = sqrt|w2|`` and ``s = sign(w2)``,
``w2_j h_j^2 = (a_j h_j) (s_j a_j h_j)``. The server computes ``u = a*(W1 x + b1)``
and ``u' = s*u`` with one plaintext multiplication (level 1), multiplies them
(level 2) and sums; a preset with primes [60, 40, 40, 60] has exactly two levels.

Layouts (why)
-------------
* One sample: the client packs ``x`` with each feature repeated ``tiles`` times
  (slot ``i*tiles + j`` holds ``x_i``; ``tiles`` = hidden width rounded up to a
  power of two, 1 for a linear model), twice for the MLP. One plaintext
  multiplication puts ``W1[i, j] x_i`` in every slot, and rotate-and-add over
  power-of-two strides (one key switch each) sums the features: 11 key switches
  for the 30-16-1 MLP instead of ~60 for TenSEAL's diagonal ``mm`` (~20 ms
  against ~370 ms per sample on one core). This uses TenSEAL's SEAL bindings
  (``tenseal.sealapi``) because ``CKKSVector`` exposes no rotation.
* A batch: one ciphertext per feature, sample ``r`` in slot ``r``. The server
  needs no rotation at all, only ``d*h`` scalar multiply-adds with one rescale
  per hidden unit, and one ciphertext set carries up to N/2 = 4096 samples at
  the same cost, so samples/second grows with the batch up to 4096.

What is not protected
---------------------
The server learns nothing about the sample (IND-CPA, 128-bit parameters). The
client is not kept from learning about the model: slots other than the logit's
hold partial sums of weighted terms (as TenSEAL's own ``dot`` leaves them), and
the protocol does not hide the model's architecture.

Precision: CKKS is approximate; see each preset's ``precision`` (max abs logit error).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
from tenseal import sealapi

from ..crypto import HEError, load_seal_ciphertext, serialize_seal_object
from .he_inference_presets import (DEFAULT_INFERENCE_PRESET, INFERENCE_PRESETS, InferencePreset, check_inference_preset,
                                   get_inference_preset)

__all__ = [
    "DEFAULT_INFERENCE_PRESET",
    "INFERENCE_PRESETS",
    "InferenceKeys",
    "InferencePreset",
    "InferenceServer",
    "InputLayout",
    "LinearModel",
    "SquareMLP",
    "check_inference_preset",
    "get_inference_preset",
    "input_layout",
]


# ---------------------------------------------------------------------------------
# Plaintext models (the server's; also the float64 reference)
# ---------------------------------------------------------------------------------

def _finite(name: str, a: Any, ndim: int) -> np.ndarray:
    arr = np.array(a, dtype=np.float64)
    if arr.ndim != ndim or arr.size == 0:
        raise HEError(f"{name} must be a non-empty {ndim}-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise HEError(f"{name} holds NaN or infinite values")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class LinearModel:
    """Logistic regression: ``logit = weight . x + bias`` (the client applies the sigmoid)."""

    weight: np.ndarray  # (d,)
    bias: float

    kind = "logreg"
    depth = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _finite("weight", self.weight, 1))
        object.__setattr__(self, "bias", float(_finite("bias", [self.bias], 1)[0]))

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden(self) -> int:
        return 0

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float64 logits of samples ``x`` (shape (n, d) or (d,))."""
        return np.asarray(x, dtype=np.float64) @ self.weight + self.bias


@dataclass(frozen=True, eq=False)
class SquareMLP:
    """One hidden layer with a square activation: ``logit = w2 . (x W1 + b1)^2 + b2``."""

    w1: np.ndarray  # (d, h)
    b1: np.ndarray  # (h,)
    w2: np.ndarray  # (h,)
    b2: float

    kind = "mlp"
    depth = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "w1", _finite("w1", self.w1, 2))
        object.__setattr__(self, "b1", _finite("b1", self.b1, 1))
        object.__setattr__(self, "w2", _finite("w2", self.w2, 1))
        object.__setattr__(self, "b2", float(_finite("b2", [self.b2], 1)[0]))
        h = self.w1.shape[1]
        if self.b1.shape != (h,) or self.w2.shape != (h,):
            raise HEError(f"b1 and w2 must have shape ({h},) to match w1 {self.w1.shape}")

    @property
    def n_features(self) -> int:
        return int(self.w1.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[1])

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64) @ self.w1 + self.b1
        return (h * h) @ self.w2 + self.b2


Model = LinearModel | SquareMLP


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class InputLayout:
    """How a client packs one sample for a given model architecture (public, weight-free).

    Slot ``c*stride*tiles + i*tiles + j`` holds ``x_i`` for ``c < copies``,
    ``i < n_features``, ``j < tiles``; other slots are 0.
    """

    n_features: int
    stride: int  # n_features rounded up to a power of two
    tiles: int  # each feature repeated this many times (hidden width rounded up; 1 for linear)
    copies: int  # the tiled block repeated (2 for the MLP: u and u')

    @property
    def length(self) -> int:
        return self.copies * self.stride * self.tiles

    def pack(self, x: np.ndarray) -> np.ndarray:
        block = np.zeros((self.stride, self.tiles))
        block[:self.n_features] = np.asarray(x, dtype=np.float64)[:, None]
        return np.tile(block.ravel(), self.copies)


def input_layout(model: Model, preset: str | InferencePreset = DEFAULT_INFERENCE_PRESET) -> InputLayout:
    """The single-sample layout for ``model`` (depends only on its shape)."""
    p = get_inference_preset(preset)
    if isinstance(model, LinearModel):
        layout = InputLayout(model.n_features, _pow2(model.n_features), 1, 1)
    elif isinstance(model, SquareMLP):
        layout = InputLayout(model.n_features, _pow2(model.n_features), _pow2(model.hidden), 2)
    else:
        raise HEError(f"unsupported model type {type(model).__name__}")
    if layout.length > p.slots:
        raise HEError(f"model with {model.n_features} features and {model.hidden} hidden units needs "
                      f"{layout.length} slots per sample; preset {p.name!r} has {p.slots}")
    return layout


# ---------------------------------------------------------------------------------
# Wire formats (all little-endian)
# ---------------------------------------------------------------------------------
#
# context : "FGIC" | version u8 | key id 8 B | u32 preset-JSON length + JSON | u64 length + TenSEAL context
# request : "FGIQ" | version u8 | kind u8 | key id 8 B | n_samples u32 | n_features u32 | stride u32 | tiles u32
#           | copies u32 | blobs (TenSEAL CKKSVectors)
# response: "FGIR" | version u8 | kind u8 | key id 8 B | n_samples u32 | blobs (SEAL ciphertexts)
# blobs   : u32 count, then per blob u32 length + bytes
#
# kind 0: one sample in the InputLayout; kind 1: a batch, one ciphertext per feature per group of
# up to N/2 samples (sample r of the group in slot r).

_VERSION = 1
_CTX_HEAD = struct.Struct("<4sB8sI")
_REQ_HEAD = struct.Struct("<4sBB8sIIIII")
_RESP_HEAD = struct.Struct("<4sBB8sI")
_SAMPLE, _BATCH = 0, 1
_MAX_BLOBS = 1 << 20
# What TenSEAL/SEAL raise through pybind11 on bad input: std::invalid_argument -> ValueError,
# std::logic_error (SEAL's checks) -> RuntimeError, std::bad_alloc (absurd sizes) -> MemoryError, ...
_BACKEND_ERRORS = (ValueError, RuntimeError, TypeError, IndexError, OverflowError, MemoryError)


def _as_bytes(data: Any, what: str) -> memoryview:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise HEError(f"{what}: expected a 1-D uint8 array, got {data.dtype} {data.shape}")
        data = np.ascontiguousarray(data)
    try:
        mv = memoryview(data)
    except TypeError:
        raise HEError(f"{what}: expected bytes, got {type(data).__name__}") from None
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _pack_blobs(blobs: list[bytes]) -> bytes:
    parts = [struct.pack("<I", len(blobs))]
    for b in blobs:
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def _unpack_blobs(buf: memoryview, pos: int, what: str) -> list[bytes]:
    try:
        (count,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if count > _MAX_BLOBS:
            raise HEError(f"{what}: {count} ciphertexts is implausible")
        blobs = []
        for _ in range(count):
            (n,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if pos + n > len(buf):
                raise HEError(f"{what}: truncated")
            blobs.append(bytes(buf[pos:pos + n]))
            pos += n
    except struct.error:
        raise HEError(f"{what}: truncated") from None
    if pos != len(buf):
        raise HEError(f"{what}: {len(buf) - pos} trailing bytes")
    return blobs


# ---------------------------------------------------------------------------------
# Client: the secret key
# ---------------------------------------------------------------------------------

def _tenseal_context(p: InferencePreset) -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
                     encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC, n_threads=1)
    ctx.global_scale = 2.0 ** p.scale_bits
    ctx.generate_galois_keys()  # all power-of-two rotations: every rotation here is one key switch
    ctx.generate_relin_keys()
    return ctx


class InferenceKeys:
    """The client's (data owner's) keys: encrypts samples, decrypts logits. Never send it to the server."""

    def __init__(self, *, preset: InferencePreset, tenseal_context: ts.Context, key_id: bytes) -> None:
        if not tenseal_context.is_private():
            raise HEError("InferenceKeys need a context with the secret key")
        self.preset = preset
        self.key_id = key_id
        self._ctx = tenseal_context
        self._seal = tenseal_context.seal_context().data
        self._decryptor = sealapi.Decryptor(self._seal, tenseal_context.secret_key().data)
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._server_bytes: bytes | None = None

    @classmethod
    def generate(cls, preset: str | InferencePreset = DEFAULT_INFERENCE_PRESET) -> InferenceKeys:
        """Fresh keys (secret, public, relinearization, Galois) from the OS's randomness."""
        p = get_inference_preset(preset)
        return cls(preset=p, tenseal_context=_tenseal_context(p), key_id=os.urandom(8))

    @property
    def tenseal_context(self) -> ts.Context:
        return self._ctx

    def is_private(self) -> bool:
        return bool(self._ctx.is_private())

    def server_context_bytes(self) -> bytes:
        """What the server gets: parameters, public/relinearization/Galois keys, no secret key (~35 MB)."""
        if self._server_bytes is None:
            pub = self._ctx.copy()
            pub.make_context_public()
            raw = pub.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                save_relin_keys=True)
            pj = self.preset.to_json().encode()
            self._server_bytes = (_CTX_HEAD.pack(b"FGIC", _VERSION, self.key_id, len(pj)) + pj
                                  + struct.pack("<Q", len(raw)) + raw)
        return self._server_bytes

    def _encrypt(self, values: np.ndarray) -> bytes:
        return ts.ckks_vector(self._ctx, values.tolist()).serialize()

    def encrypt_sample(self, x: np.ndarray, layout: InputLayout) -> bytes:
        """One sample (raw features, shape (d,)) packed for the server's model ``layout``."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (layout.n_features,):
            raise HEError(f"sample has shape {x.shape}, the model takes ({layout.n_features},)")
        if not np.all(np.isfinite(x)):
            raise HEError("sample holds NaN or infinite values")
        if layout.length > self.preset.slots:
            raise HEError(f"layout needs {layout.length} slots, preset {self.preset.name!r} has {self.preset.slots}")
        head = _REQ_HEAD.pack(b"FGIQ", _VERSION, _SAMPLE, self.key_id, 1, layout.n_features, layout.stride,
                              layout.tiles, layout.copies)
        return head + _pack_blobs([self._encrypt(layout.pack(x))])

    def encrypt_batch(self, x: np.ndarray) -> bytes:
        """Samples ``x`` of shape (n, d): one ciphertext per feature per group of up to N/2 samples."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise HEError(f"a batch must have shape (n, d) with n, d >= 1, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise HEError("batch holds NaN or infinite values")
        n, d = x.shape
        s = self.preset.slots
        blobs = [self._encrypt(x[g:g + s, i]) for g in range(0, n, s) for i in range(d)]
        return _REQ_HEAD.pack(b"FGIQ", _VERSION, _BATCH, self.key_id, n, d, 0, 0, 0) + _pack_blobs(blobs)

    def decrypt_logits(self, response: Any) -> np.ndarray:
        """The logits of a response: shape (1,) for one sample, (n,) for a batch."""
        buf = _as_bytes(response, "response")
        try:
            magic, version, kind, key_id, n = _RESP_HEAD.unpack_from(buf, 0)
        except struct.error:
            raise HEError("response: truncated header") from None
        if magic != b"FGIR" or version != _VERSION or kind not in (_SAMPLE, _BATCH):
            raise HEError("not an inference response (bad magic, version or kind)")
        if key_id != self.key_id:
            raise HEError("response was computed under other keys")
        blobs = _unpack_blobs(buf, _RESP_HEAD.size, "response")
        groups = 1 if kind == _SAMPLE else -(-n // self.preset.slots)
        if n < 1 or (kind == _SAMPLE and n != 1) or len(blobs) != groups:
            raise HEError(f"response: {len(blobs)} ciphertexts for {n} samples")
        out = []
        for g, blob in enumerate(blobs):
            try:
                ct = load_seal_ciphertext(self._seal, blob)
                if ct.size() != 2:
                    raise ValueError(f"ciphertext of size {ct.size()}")
                pt = sealapi.Plaintext()
                self._decryptor.decrypt(ct, pt)
                values = self._encoder.decode_double(pt)
            except _BACKEND_ERRORS as e:
                raise HEError(f"response ciphertext {g} cannot be decrypted: {e}") from None
            take = 1 if kind == _SAMPLE else min(self.preset.slots, n - g * self.preset.slots)
            out.append(np.asarray(values[:take], dtype=np.float64))
        return np.concatenate(out)

    def __repr__(self) -> str:
        return f"InferenceKeys(preset={self.preset.name!r}, key_id={self.key_id.hex()}, private=True)"


# ---------------------------------------------------------------------------------
# Server: public keys and the plaintext model
# ---------------------------------------------------------------------------------

def _parse_context(data: Any) -> tuple[InferencePreset, bytes, ts.Context]:
    buf = _as_bytes(data, "server context")
    try:
        magic, version, key_id, plen = _CTX_HEAD.unpack_from(buf, 0)
        pos = _CTX_HEAD.size
        if magic != b"FGIC" or version != _VERSION:
            raise HEError("not an inference server context (bad magic or version)")
        if pos + plen > len(buf):
            raise HEError("server context: truncated")
        preset = InferencePreset.from_json(bytes(buf[pos:pos + plen]).decode("utf-8", "strict"))
        pos += plen
        (tlen,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        if pos + tlen != len(buf):
            raise HEError("server context: truncated or oversized")
    except (struct.error, UnicodeDecodeError) as e:
        raise HEError(f"malformed server context: {e}") from None
    try:
        ctx = ts.context_from(bytes(buf[pos:]), n_threads=1)
    except _BACKEND_ERRORS as e:
        raise HEError(f"malformed TenSEAL context: {e}") from None
    if ctx.is_private():
        raise HEError("a server context must not hold the secret key")
    parms = ctx.seal_context().data.key_context_data().parms()
    bits = tuple(m.bit_count() for m in parms.coeff_modulus())
    if parms.poly_modulus_degree() != preset.poly_modulus_degree or bits != preset.coeff_mod_bit_sizes:
        raise HEError(f"server context parameters (N={parms.poly_modulus_degree()}, primes {list(bits)}) "
                      f"do not match preset {preset.name!r}")
    try:
        scale = ctx.global_scale
    except ValueError:
        scale = None
    if scale != 2.0 ** preset.scale_bits:
        raise HEError(f"server context scale does not match preset {preset.name!r}")
    if not (ctx.has_galois_keys() and ctx.has_relin_keys()):
        raise HEError("server context lacks the Galois or relinearization keys")
    return preset, key_id, ctx


class InferenceServer:
    """The model owner's side: a public context (no secret key) and a plaintext model."""

    def __init__(self, context: Any, model: Model) -> None:
        if not isinstance(model, (LinearModel, SquareMLP)):
            raise HEError(f"unsupported model type {type(model).__name__}")
        self.preset, self.key_id, self._ctx = _parse_context(context)
        p = self.preset
        if model.depth > p.depth:
            raise HEError(f"a {model.kind} model needs depth {model.depth}; preset {p.name!r} has {p.depth}")
        self.model = model
        self.layout = input_layout(model, p)
        self._seal = self._ctx.seal_context().data
        self._ev = sealapi.Evaluator(self._seal)
        self._enc = sealapi.CKKSEncoder(self._seal)
        self._galois = self._ctx.galois_keys().data
        self._relin = self._ctx.relin_keys().data
        self._first = self._seal.first_parms_id()
        # Plaintexts are encoded at the scale of the prime the next rescale drops, so the
        # rescaled product is at exactly 2^scale_bits and biases can be encoded in advance.
        self._q_drop = float(self._seal.first_context_data().parms().coeff_modulus()[-1].value())
        self._scale = 2.0 ** p.scale_bits
        self._level1 = self._seal.first_context_data().next_context_data().parms_id()
        self._prepare_sample_plaintexts()
        if isinstance(model, LinearModel):
            nonzero = np.rint(np.abs(model.weight) * self._q_drop) > 0
        else:
            nonzero = np.rint(np.abs(model.w1) * np.sqrt(np.abs(model.w2)) * self._q_drop) > 0
        if not nonzero.any():
            raise HEError("the model's weights are all zero at this scale: nothing to evaluate")

    @property
    def tenseal_context(self) -> ts.Context:
        return self._ctx

    def is_private(self) -> bool:
        return bool(self._ctx.is_private())

    def _encode(self, values: Any, parms_id: Any, scale: float) -> Any:
        pt = sealapi.Plaintext()
        self._enc.encode(values, parms_id, scale, pt)
        return pt

    def _prepare_sample_plaintexts(self) -> None:
        m, lay, s = self.model, self.layout, self.preset.slots
        weights, bias = np.zeros(s), np.zeros(s)
        if isinstance(m, LinearModel):
            weights[:m.n_features] = m.weight
        else:
            a, sign = np.sqrt(np.abs(m.w2)), np.sign(m.w2)
            block = lay.stride * lay.tiles
            for c, f in enumerate((a, sign * a)):  # copy 0 computes u, copy 1 computes u' = sign * u
                w = np.zeros((lay.stride, lay.tiles))
                w[:m.n_features, :m.hidden] = m.w1 * f
                weights[c * block:(c + 1) * block] = w.ravel()
                bias[c * block:c * block + m.hidden] = m.b1 * f
        self._pt_weights = self._encode(weights.tolist(), self._first, self._q_drop)
        self._pt_bias = self._encode(m.bias if isinstance(m, LinearModel) else bias.tolist(), self._level1, self._scale)

    # -- helpers ----------------------------------------------------------------------
    def _load_request_ct(self, blob: bytes, size: int, what: str) -> Any:
        try:
            vec = ts.ckks_vector_from(self._ctx, blob)
            cts = vec.ciphertext()
        except _BACKEND_ERRORS as e:
            raise HEError(f"{what}: malformed ciphertext: {e}") from None
        if len(cts) != 1 or vec.size() != size:
            raise HEError(f"{what}: expected one ciphertext of {size} values, got {len(cts)} of {vec.size()}")
        ct = cts[0]
        if ct.size() != 2 or list(ct.parms_id()) != list(self._first) or ct.scale != self._scale:
            raise HEError(f"{what}: not a fresh ciphertext at scale 2^{self.preset.scale_bits}")
        return ct

    def _rotate_sum(self, ct: Any, steps: list[int]) -> None:
        tmp = sealapi.Ciphertext()
        for step in steps:
            self._ev.rotate_vector(ct, step, self._galois, tmp)
            self._ev.add_inplace(ct, tmp)

    def _finish(self, ct: Any) -> bytes:
        while ct.coeff_modulus_size() > 1:  # the last prime alone holds the result: smallest response
            self._ev.mod_switch_to_next_inplace(ct)
        return serialize_seal_object(ct)

    # -- one sample -------------------------------------------------------------------
    def _evaluate_sample(self, ct: Any) -> bytes:
        ev, lay = self._ev, self.layout
        ev.multiply_plain_inplace(ct, self._pt_weights)
        ev.rescale_to_next_inplace(ct)
        # sum the features: slot j (< tiles) of each copy gets sum_i W[i, j] x_i
        self._rotate_sum(ct, [lay.tiles << k for k in reversed(range(lay.stride.bit_length() - 1))])
        if isinstance(self.model, LinearModel):
            ev.add_plain_inplace(ct, self._pt_bias)
            return self._finish(ct)
        ev.add_plain_inplace(ct, self._pt_bias)
        other = sealapi.Ciphertext()
        ev.rotate_vector(ct, lay.stride * lay.tiles, self._galois, other)  # u' next to u
        ev.multiply_inplace(ct, other)  # slot j: w2_j h_j^2
        ev.rescale_to_next_inplace(ct)
        ev.relinearize_inplace(ct, self._relin)  # after the rescale: key switching is cheaper one level down
        self._rotate_sum(ct, [1 << k for k in reversed(range(lay.tiles.bit_length() - 1))])
        ev.add_plain_inplace(ct, self._encode(self.model.b2, ct.parms_id(), ct.scale))
        return self._finish(ct)

    # -- a batch ----------------------------------------------------------------------
    def _scaled(self, ct: Any, w: float, out: Any, acc: Any | None) -> Any | None:
        """acc += w * ct (at the doubled scale, rescaled later); zero weights are skipped
        (SEAL refuses a product with an all-zero plaintext)."""
        if round(abs(w) * self._q_drop) == 0:
            return acc
        pt = self._encode(float(w), self._first, self._q_drop)
        if acc is None:
            acc = sealapi.Ciphertext()
            self._ev.multiply_plain(ct, pt, acc)
        else:
            self._ev.multiply_plain(ct, pt, out)
            self._ev.add_inplace(acc, out)
        return acc

    def _evaluate_group(self, cts: list[Any]) -> bytes:
        ev, m, tmp = self._ev, self.model, sealapi.Ciphertext()
        if isinstance(m, LinearModel):
            acc = None
            for i, ct in enumerate(cts):
                acc = self._scaled(ct, m.weight[i], tmp, acc)
            ev.rescale_to_next_inplace(acc)
            ev.add_plain_inplace(acc, self._encode(m.bias, acc.parms_id(), acc.scale))
            return self._finish(acc)
        a, sign = np.sqrt(np.abs(m.w2)), np.sign(m.w2)
        total, total_sign = None, 0.0
        for j in range(m.hidden):
            u = None
            for i, ct in enumerate(cts):
                u = self._scaled(ct, a[j] * m.w1[i, j], tmp, u)
            if u is None:
                continue
            ev.rescale_to_next_inplace(u)
            if a[j] * m.b1[j] != 0:
                ev.add_plain_inplace(u, self._encode(float(a[j] * m.b1[j]), u.parms_id(), u.scale))
            ev.square_inplace(u)  # relinearized once, on the sum
            if total is None:
                total, total_sign = u, sign[j]
            elif sign[j] == total_sign:
                ev.add_inplace(total, u)
            else:
                ev.sub_inplace(total, u)
        if total is None:
            raise HEError("the model's hidden units are all zero at this scale")
        if total_sign < 0:
            ev.negate_inplace(total)
        ev.relinearize_inplace(total, self._relin)
        ev.rescale_to_next_inplace(total)
        ev.add_plain_inplace(total, self._encode(m.b2, total.parms_id(), total.scale))
        return self._finish(total)

    # -- the entry point --------------------------------------------------------------
    def evaluate(self, request: Any) -> bytes:
        """Evaluate the model on an encrypted request; returns the encrypted logits (bytes)."""
        buf = _as_bytes(request, "request")
        try:
            magic, version, kind, key_id, n, d, stride, tiles, copies = _REQ_HEAD.unpack_from(buf, 0)
        except struct.error:
            raise HEError("request: truncated header") from None
        if magic != b"FGIQ" or version != _VERSION or kind not in (_SAMPLE, _BATCH):
            raise HEError("not an inference request (bad magic, version or kind)")
        if key_id != self.key_id:
            raise HEError("request was encrypted under other keys than this server's context")
        if d != self.model.n_features:
            raise HEError(f"request has {d} features, the model takes {self.model.n_features}")
        blobs = _unpack_blobs(buf, _REQ_HEAD.size, "request")
        s = self.preset.slots
        try:
            if kind == _SAMPLE:
                lay = self.layout
                if (n, stride, tiles, copies) != (1, lay.stride, lay.tiles, lay.copies) or len(blobs) != 1:
                    raise HEError("request is not packed in this model's input layout")
                out = [self._evaluate_sample(self._load_request_ct(blobs[0], lay.length, "request"))]
            else:
                groups = -(-n // s)
                if n < 1 or len(blobs) != groups * d:
                    raise HEError(f"request: {len(blobs)} ciphertexts for {n} samples of {d} features")
                out = []
                for g in range(groups):
                    size = min(s, n - g * s)
                    cts = [self._load_request_ct(blobs[g * d + i], size, f"request ciphertext {g * d + i}")
                           for i in range(d)]
                    out.append(self._evaluate_group(cts))
        except HEError:
            raise
        except _BACKEND_ERRORS as e:  # SEAL's own checks (scale out of bounds, mismatched parameters, ...)
            raise HEError(f"cannot evaluate the request: {e}") from None
        return _RESP_HEAD.pack(b"FGIR", _VERSION, kind, self.key_id, n) + _pack_blobs(out)

    def __repr__(self) -> str:
        return (f"InferenceServer(preset={self.preset.name!r}, model={self.model.kind}, "
                f"key_id={self.key_id.hex()}, private={self.is_private()})")
