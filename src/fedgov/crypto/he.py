"""Homomorphic encryption of whole model updates with TenSEAL (CKKS and BFV).

The operations: :func:`encrypt_update`, :func:`aggregate`, :func:`decrypt_aggregate`
(and :func:`check_update`). They work on numpy arrays and bytes; the Flower apps carry
the bytes (``EncryptedUpdate.to_numpy()``, a ``uint8`` array) and call these functions
through :mod:`fedgov.crypto`. The parts, each in its module (imports run one way, down
this list):

* :mod:`~fedgov.crypto.he_presets`: presets and parameter checks (no TenSEAL, no numpy);
* :mod:`~fedgov.crypto.he_scratch`: private scratch files (``tenseal.sealapi`` file I/O);
* :mod:`~fedgov.crypto.he_keys`: :class:`SecretKeys`, :class:`PublicContext`, :func:`generate_keys`;
* :mod:`~fedgov.crypto.he_wire`: the wire format, :class:`EncryptedUpdate`;
* :mod:`~fedgov.crypto.he_codec`: values to ciphertexts in TenSEAL's framing, and the layout;
* :mod:`~fedgov.crypto.he_workers`: the encryption worker processes;
* this module: the operations.

TenSEAL is imported only inside fedgov.crypto (and the benchmarks in fedgov.bench),
and only by the functions that need it: ``import fedgov.crypto`` does not import it.

Roles and keys
--------------
``generate_keys(preset, mode=...)`` makes a :class:`SecretKeys` (the TenSEAL
context with the secret key). Its :meth:`SecretKeys.public_context` is a
:class:`PublicContext`: no secret key, ``is_private()`` is False.

* ``mode="clients"``: one cooperative (or, in simulation, the launcher) generates
  the keys and every cooperative holds the same :class:`SecretKeys`; they
  encrypt symmetrically with it (cheaper) and decrypt the aggregate themselves.
  The aggregator gets the :class:`PublicContext`, which here holds no key at
  all: it can add ciphertexts, and neither encrypt nor decrypt.
* ``mode="custodian"``: a separate oversight key holder generates the keys and
  keeps :class:`SecretKeys`; cooperatives and aggregator get the
  :class:`PublicContext` (with the public key), cooperatives encrypt with it
  (public-key encryption) and only the custodian decrypts, and only aggregates.

In both modes the aggregator only ever holds a :class:`PublicContext`, and
:func:`decrypt_aggregate` needs :class:`SecretKeys`.

Weights (who applies them, what can be checked)
-----------------------------------------------
Each cooperative multiplies its own update by its own FedAvg weight before
encrypting (``encrypt_update(..., weight=w_k)``), and the weight travels in
plaintext in the update's header. The aggregator adds the ciphertexts and the
plaintext weights (:func:`aggregate`); the decrypting party divides the
decrypted sum by the summed weight. Use fractional weights
``w_k = n_k / n_total`` (``n_total`` = the round's total from the discovery
query, or all cooperatives' examples): every preset accepts them, and
``compact`` requires ``0 < w_k <= 1`` with weights summing to at most 1 per
aggregate (that is what its overflow bound assumes). The aggregator cannot
verify a weight: ``n_k`` is self-reported and the update is hidden, so a
cooperative that overstates its size (or scales its update by more than its
stated weight) gets more influence and nobody can tell from the ciphertexts.
It can only check that weights are positive and, for ``compact``, that they sum
to at most 1 and that at most ``max_clients`` updates are summed.

Precision
---------
CKKS is approximate: encryption adds noise of about 2e-8 (symmetric) to 1.5e-7
(public key) at the standard preset's scale 2^37, and
TenSEAL draws its randomness from the OS, so decrypted aggregates are not
bit-identical between runs (keys cannot be derived from a seed either). BFV
(``compact``) is exact on integers: its only error is the quantization, which
is deterministic (round to nearest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .he_check import CheckKey, check_slots, check_values, verify_checks
from .he_codec import _complex_codec, _layout, _load_vector, _vector_class, data_slot_count
from .he_keys import PublicContext, SecretKeys, _Context
from .he_presets import HEError
from .he_wire import _U32, EncryptedUpdate, UpdateLike
from .he_workers import _encrypt_blocks, default_workers
from .packing import flatten, pack_digits, unflatten, unpack_digits

__all__ = ["aggregate", "check_update", "decrypt_aggregate", "encrypt_update", "CheckStamp", "SumClaim"]


@dataclass(frozen=True)
class CheckStamp:
    """What a cooperative needs to fill its check slots: the check key, the round and who it is."""

    key: CheckKey
    server_round: int
    cooperative: int


@dataclass(frozen=True)
class SumClaim:
    """What the key holder verifies before releasing a sum: whose updates of which round it claims to be."""

    key: CheckKey
    server_round: int
    contributors: tuple[int, ...]


# ---------------------------------------------------------------------------------
# An update's header against a context
# ---------------------------------------------------------------------------------

def _check_update(upd: EncryptedUpdate, context: _Context, what: str) -> list[int]:
    p = context.preset
    if upd.fingerprint != p.fingerprint():
        raise HEError(f"{what}: encrypted with preset {upd.preset_name!r}, but the context is for {p.name!r} "
                      f"(or its parameters differ)")
    if upd.key_id != context.key_id:
        raise HEError(f"{what}: encrypted under different keys (key id {upd.key_id.hex()}, "
                      f"context has {context.key_id.hex()})")
    if upd.num_params > upd.num_chunks * p.data_values_per_ciphertext:  # before building a layout for it
        raise HEError(f"{what}: {upd.num_chunks} ciphertexts cannot hold {upd.num_params} parameters")
    _, sizes = _layout(p, upd.specs)
    if upd.num_chunks != len(sizes):
        raise HEError(f"{what}: {upd.num_chunks} ciphertexts where the shapes need {len(sizes)}")
    return sizes


def check_update(update: EncryptedUpdate, *, context: PublicContext | SecretKeys,
                 shapes: Sequence[Sequence[int]] | None = None, what: str = "update") -> list[int]:
    """Header checks of one update (preset, keys, layout, shapes); raises :class:`HEError`.

    Cheap: no ciphertext is loaded (``aggregate`` still validates each ciphertext's bytes).
    Returns the number of slots of each ciphertext.
    """
    sizes = _check_update(update, context, what)
    if shapes is not None and [tuple(s) for s in shapes] != update.shapes:
        raise HEError(f"{what} has layer shapes {update.shapes}, expected {[tuple(s) for s in shapes]}")
    return sizes


# ---------------------------------------------------------------------------------
# The operations
# ---------------------------------------------------------------------------------

def encrypt_update(arrays: Sequence[np.ndarray], *, context: SecretKeys | PublicContext, weight: float,
                   workers: int | None = None, check: CheckStamp | None = None) -> EncryptedUpdate:
    """Weight, pack densely and encrypt one cooperative's update.

    ``weight``: this cooperative's FedAvg weight, applied here (w x) before
    encryption; best ``n_k / n_total`` (``compact`` requires ``0 < weight <= 1``).
    ``context``: the shared :class:`SecretKeys` (mode ``clients``) or the
    custodian's :class:`PublicContext` (mode ``custodian``).
    ``workers``: processes to encrypt with (default :func:`default_workers`;
    pass 1 where several clients already share the machine, as in simulation).
    ``check``: fills every ciphertext's check slots (``fedgov.crypto.he_check``) so that a key
    holder can tell the whole sum of the claimed updates from anything else; without it they
    hold zeros, which no key holder of a federation accepts (benchmarks and unit tests only).
    """
    if not isinstance(context, (SecretKeys, PublicContext)):
        raise HEError("context must be SecretKeys or PublicContext")
    if not context.can_encrypt:
        raise HEError("this PublicContext holds no public key (key_holder = 'clients'): "
                      "cooperatives encrypt with the shared SecretKeys")
    p = context.preset
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise HEError(f"weight must be a number, not {weight!r}") from None
    if not (math.isfinite(weight) and weight > 0):
        raise HEError(f"weight must be positive and finite, got {weight}")
    try:
        flat, specs = flatten(arrays, dtype=None)  # widened below, in one pass with the weighting
    except TypeError as e:
        raise HEError(str(e)) from None
    if flat.size == 0:
        raise HEError("nothing to encrypt: the update has no parameters")
    lo, hi = float(flat.min()), float(flat.max())  # NaN and inf propagate: two passes, no temporary array
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise HEError("the update holds NaN or infinite values")
    num_clipped: int | None = None
    if p.scheme == "ckks":
        peak = max(hi, -lo) * weight
        if peak > p.ckks_value_bound:
            raise HEError(f"preset {p.name!r}: |weight x value| reaches {peak:.4g}, above {p.ckks_value_bound:.4g} "
                          f"(the modulus headroom shared by max_clients = {p.max_clients} updates); use "
                          f"fractional weights n_k / n_total")
        values = np.multiply(flat, weight, dtype=np.float64)
    else:
        if weight > 1.0:
            raise HEError(f"preset {p.name!r} needs a fractional weight 0 < w <= 1 (n_k / n_total), got {weight}")
        R = p.clip_range
        flat = flat.astype(np.float64, copy=False)  # quantize in float64, whatever the arrays were
        num_clipped = int(np.count_nonzero(np.abs(flat) > R))
        q = np.rint(np.clip(flat, -R, R) * (weight / p.quant_step)).astype(np.int64)
        values = q
    ranges, _ = _layout(p, specs)
    blocks = [_with_checks(p, _data_slots(p, values[a:b]), check, i) for i, (a, b) in enumerate(ranges)]
    wire_chunks = _encrypt_blocks(context, blocks, default_workers() if workers is None else int(workers))
    head = EncryptedUpdate(preset_name=p.name, fingerprint=p.fingerprint(), key_id=context.key_id, specs=specs,
                           contributors=1, weight=weight, chunks=[])._header_bytes()
    # One join builds the message (a 10^7-parameter update is ~150 MB): parsing it back only indexes it.
    update = EncryptedUpdate.from_bytes(b"".join([head, _U32.pack(len(blocks)), *wire_chunks]))
    update.num_clipped = num_clipped
    return update


def _data_slots(p: Any, values: np.ndarray) -> np.ndarray:
    """One ciphertext's data as the slot values the checks are computed on."""
    if p.scheme == "bfv":
        return pack_digits(values, p.digit_base, p.values_per_slot)
    if p.complex_packed and values.size % 2:  # whole complex slots, so the checks start at a slot
        return np.append(values, 0.0)
    return values


def _with_checks(p: Any, data: np.ndarray, check: CheckStamp | None, chunk: int) -> np.ndarray:
    if check is None:
        checks = np.zeros(check_slots(p), dtype=data.dtype)
    else:
        checks = check_values(check.key, p, data, server_round=check.server_round, cooperative=check.cooperative,
                              chunk=chunk).astype(data.dtype)
    return np.concatenate([data, checks])


def aggregate(updates: Sequence[UpdateLike], *, context: PublicContext | SecretKeys) -> EncryptedUpdate:
    """Sum encrypted updates (and their plaintext weights) without decrypting anything.

    Every update is checked against the first and against ``context`` (same
    preset, same keys, same shapes); malformed bytes raise :class:`HEError`.
    Each ciphertext is deserialized once and added in place.
    """
    if not isinstance(context, (SecretKeys, PublicContext)):
        raise HEError("context must be a PublicContext (or SecretKeys)")
    if len(updates) == 0:
        raise HEError("nothing to aggregate")
    p = context.preset
    cls = _vector_class(p)
    ctx = context.tenseal_context
    acc: list[Any] | None = None
    first: EncryptedUpdate | None = None
    contributors, weight = 0, 0.0
    for i, item in enumerate(updates):
        upd = EncryptedUpdate.from_bytes(item)
        what = f"update {i}"
        sizes = _check_update(upd, context, what)
        if first is None:
            first = upd
        elif upd.specs != first.specs:
            raise HEError(f"{what}: layer shapes differ from update 0")
        contributors += upd.contributors
        weight += upd.weight
        if contributors > p.max_clients:
            raise HEError(f"preset {p.name!r} sums at most {p.max_clients} updates per aggregate")
        chunks = upd.iter_chunk_bytes()
        if acc is None:
            acc = [_load_vector(cls, ctx, c, s, p, what) for c, s in zip(chunks, sizes)]
            continue
        for j, (c, s) in enumerate(zip(chunks, sizes)):
            v = _load_vector(cls, ctx, c, s, p, what)
            try:
                acc[j].add_(v)
            except Exception as e:
                raise HEError(f"{what}: ciphertext {j} cannot be added: {e}") from None
    if p.scheme == "bfv" and weight > 1.0 + 1e-9:
        raise HEError(f"preset {p.name!r}: weights sum to {weight:.6g} > 1, so the quantized sum may overflow")
    assert first is not None and acc is not None
    return EncryptedUpdate(preset_name=p.name, fingerprint=p.fingerprint(), key_id=context.key_id,
                           specs=first.specs, contributors=contributors, weight=weight, vectors=acc)


def decrypt_aggregate(aggregate: UpdateLike, *, keys: SecretKeys, total_weight: float | None = None,
                      shapes: Sequence[Sequence[int]] | None = None, claim: SumClaim | None = None
                      ) -> list[np.ndarray]:
    """Decrypt a sum of weighted updates and divide by the total weight: the FedAvg arrays.

    ``total_weight``: the plaintext sum of the weights (default: the one the
    aggregate carries). ``shapes``: if given, the layer shapes are checked. ``claim``: every
    ciphertext's check slots must show the whole sum of these contributors' updates of
    this round, else :class:`HEError` and nothing is returned (a key holder always passes one).
    """
    if not isinstance(keys, SecretKeys):
        raise HEError("decrypting needs SecretKeys; a PublicContext cannot decrypt")
    upd = EncryptedUpdate.from_bytes(aggregate)
    p = keys.preset
    sizes = check_update(upd, context=keys, shapes=shapes, what="aggregate")
    W = upd.weight if total_weight is None else float(total_weight)
    if not (math.isfinite(W) and W > 0):
        raise HEError(f"total_weight must be positive, got {W}")
    if upd.contributors > p.max_clients or (p.scheme == "bfv" and upd.weight > 1.0 + 1e-9):
        raise HEError(f"preset {p.name!r}: {upd.contributors} updates of total weight {upd.weight:.6g} "
                      f"(at most {p.max_clients} updates{', weights summing to <= 1' if p.scheme == 'bfv' else ''}): "
                      f"the sum may have overflowed")
    cls = _vector_class(p)
    ctx = keys.tenseal_context
    ranges, _ = _layout(p, upd.specs)
    pieces: list[np.ndarray] = []  # grown chunk by chunk: memory follows the real ciphertexts, not the header
    for j, ((a, b), s, chunk) in enumerate(zip(ranges, sizes, upd.iter_chunk_bytes())):
        vec = _load_vector(cls, ctx, chunk, s, p, "aggregate")
        data_len = data_slot_count(p, b - a) * p.values_per_slot if p.complex_packed else data_slot_count(p, b - a)
        try:
            if p.complex_packed:
                plain = _complex_codec(ctx).decrypt(vec, data_len + check_slots(p))
            else:
                plain = np.asarray(vec.decrypt(), dtype=np.float64 if p.scheme == "ckks" else np.int64)
        except Exception as e:
            raise HEError(f"cannot decrypt ciphertext {j}: {e}") from None
        data, checks = plain[:data_len], plain[data_len:data_len + check_slots(p)]
        if claim is not None:
            verify_checks(claim.key, p, data, checks, server_round=claim.server_round,
                          contributors=list(claim.contributors), chunk=j)
        if p.scheme == "ckks":
            pieces.append(np.asarray(data[:b - a], dtype=np.float64))
        else:
            pieces.append(unpack_digits(data, p.digit_base, p.values_per_slot, b - a).astype(np.float64))
    flat = np.concatenate(pieces)
    if p.scheme == "bfv":
        flat *= p.quant_step
    flat /= W
    return unflatten(flat, upd.specs)
