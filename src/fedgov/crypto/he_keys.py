"""HE keys and contexts: who holds what (:class:`SecretKeys`, :class:`PublicContext`).

``generate_keys(preset, mode=...)`` makes a :class:`SecretKeys` (the TenSEAL context
with the secret key); its :meth:`SecretKeys.public_context` is a :class:`PublicContext`
(no secret key). Which party holds which: the docstring of :mod:`fedgov.crypto.he`.
TenSEAL is imported when a context is first made or loaded, not with this module.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .he_presets import DEFAULT_PRESET, HEError, HEPreset, get_preset

if TYPE_CHECKING:
    import tenseal as ts

__all__ = ["PublicContext", "SecretKeys", "generate_keys", "load_or_generate_keys"]

_MODES = ("clients", "custodian")
_CTX_MAGIC = b"FGHK"
_VERSION = 1


def _as_buffer(data: Any) -> memoryview:
    """Untrusted bytes (bytes-like, or a 1-D uint8 array) as a flat byte view; raises :class:`HEError`."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise HEError(f"expected a 1-D uint8 array of HE bytes, got {data.dtype} {data.shape}")
        data = np.ascontiguousarray(data)
    try:
        mv = memoryview(data)
    except TypeError:
        raise HEError(f"expected bytes, got {type(data).__name__}") from None
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _tenseal_context(preset: HEPreset, symmetric: bool) -> ts.Context:
    import tenseal as ts

    enc = ts.ENCRYPTION_TYPE.SYMMETRIC if symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    if preset.scheme == "ckks":
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, preset.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes), encryption_type=enc, n_threads=1)
        ctx.global_scale = 2.0 ** preset.scale_bits
    else:
        ctx = ts.context(ts.SCHEME_TYPE.BFV, preset.poly_modulus_degree, plain_modulus=preset.plain_modulus,
                         coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes), encryption_type=enc, n_threads=1)
    return ctx


def _is_symmetric(ctx: ts.Context) -> bool:
    try:
        ctx.has_public_key()
    except ValueError:  # "has_public_key is not supported for symmetric encryption"
        return True
    return False


def _ctx_bytes(ctx: ts.Context, *, secret: bool) -> bytes:
    sym = _is_symmetric(ctx)
    return ctx.serialize(save_public_key=not sym, save_secret_key=secret,
                         save_galois_keys=False, save_relin_keys=False)


def _load_tenseal_context(data: bytes) -> ts.Context:
    import tenseal as ts

    try:
        return ts.context_from(data, n_threads=1)
    except Exception as e:  # TenSEAL raises ValueError/RuntimeError on malformed input
        raise HEError(f"malformed TenSEAL context: {e}") from None


class _Context:
    """Shared parts of :class:`PublicContext` and :class:`SecretKeys`."""

    _KIND = -1

    def __init__(self, *, preset: HEPreset, mode: str, key_id: bytes, tenseal_context: ts.Context,
                 raw: bytes | None = None) -> None:
        if mode not in _MODES:
            raise HEError(f"secure.key_holder must be one of {_MODES}, not {mode!r}")
        self.preset = preset
        self.mode = mode
        self.key_id = key_id
        self._ctx = tenseal_context
        self._raw = raw  # TenSEAL bytes, kept for worker processes and to_bytes()
        self._symmetric = _is_symmetric(tenseal_context)

    @property
    def tenseal_context(self) -> ts.Context:
        """The underlying TenSEAL context (for benchmarks; keep TenSEAL inside fedgov.crypto)."""
        return self._ctx

    def is_private(self) -> bool:
        return bool(self._ctx.is_private())

    @property
    def can_encrypt(self) -> bool:
        return self.is_private() or not self._symmetric

    def _tenseal_bytes(self) -> bytes:
        if self._raw is None:
            self._raw = _ctx_bytes(self._ctx, secret=self.is_private())
        return self._raw

    def _encryption_bytes(self) -> bytes:
        """What a worker process needs to encrypt: the public context, or the secret one if symmetric."""
        return self._tenseal_bytes()

    def to_bytes(self) -> bytes:
        pj = self.preset.to_json().encode()
        head = struct.pack("<4sBBB8sI", _CTX_MAGIC, _VERSION, self._KIND, _MODES.index(self.mode),
                           self.key_id, len(pj))
        tb = self._tenseal_bytes()
        return head + pj + struct.pack("<Q", len(tb)) + tb

    serialize = to_bytes

    def to_numpy(self) -> np.ndarray:
        return np.frombuffer(self.to_bytes(), dtype=np.uint8)

    @staticmethod
    def _parse(data: Any, kind: int) -> tuple[HEPreset, str, bytes, ts.Context, bytes]:
        buf = _as_buffer(data)
        try:
            magic, version, k, mode_i, key_id, plen = struct.unpack_from("<4sBBB8sI", buf, 0)
            pos = struct.calcsize("<4sBBB8sI")
            if magic != _CTX_MAGIC:
                raise HEError("not an HE context/keys blob (bad magic)")
            if version != _VERSION:
                raise HEError(f"unsupported HE context version {version}")
            if k != kind:
                want = "SecretKeys" if kind == 1 else "PublicContext"
                raise HEError(f"expected {want} bytes, got {'SecretKeys' if k == 1 else 'PublicContext'}")
            if mode_i >= len(_MODES):
                raise HEError("bad key-holder mode")
            if pos + plen > len(buf):
                raise HEError("truncated HE context")
            preset = HEPreset.from_json(bytes(buf[pos:pos + plen]).decode("utf-8", "strict"))
            pos += plen
            (tlen,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
            if pos + tlen != len(buf):
                raise HEError("truncated or oversized HE context")
            raw = bytes(buf[pos:pos + tlen])
        except (struct.error, UnicodeDecodeError) as e:
            raise HEError(f"malformed HE context bytes: {e}") from None
        return preset, _MODES[mode_i], key_id, _load_tenseal_context(raw), raw

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(preset={self.preset.name!r}, mode={self.mode!r}, "
                f"key_id={self.key_id.hex()}, private={self.is_private()})")


class PublicContext(_Context):
    """What the aggregator (and, in custodian mode, the cooperatives) hold: no secret key.

    In ``clients`` mode it holds no key at all (adds only); in ``custodian``
    mode it holds the public key, so cooperatives can encrypt with it.
    """

    _KIND = 0

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if self._ctx.is_private():
            raise HEError("a PublicContext must not hold a secret key")

    @classmethod
    def from_bytes(cls, data: Any) -> PublicContext:
        preset, mode, key_id, ctx, raw = cls._parse(data, cls._KIND)
        return cls(preset=preset, mode=mode, key_id=key_id, tenseal_context=ctx, raw=raw)


class SecretKeys(_Context):
    """The secret context: whoever holds it can decrypt. Never send it to the aggregator."""

    _KIND = 1

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if not self._ctx.is_private():
            raise HEError("SecretKeys bytes hold no secret key")
        self._public: PublicContext | None = None
        self._enc_raw: bytes | None = None

    @classmethod
    def from_bytes(cls, data: Any) -> SecretKeys:
        preset, mode, key_id, ctx, raw = cls._parse(data, cls._KIND)
        return cls(preset=preset, mode=mode, key_id=key_id, tenseal_context=ctx, raw=raw)

    def public_context(self) -> PublicContext:
        """The context to hand to the aggregator (and, in custodian mode, to the cooperatives)."""
        if self._public is None:
            if self._symmetric:  # no public key exists: a keyless context with the same parameters
                raw = self._ctx.serialize(save_public_key=False, save_secret_key=False,
                                          save_galois_keys=False, save_relin_keys=False)
            else:
                pub = self._ctx.copy()
                pub.make_context_public()
                raw = pub.serialize(save_public_key=True, save_secret_key=False,
                                    save_galois_keys=False, save_relin_keys=False)
            self._public = PublicContext(preset=self.preset, mode=self.mode, key_id=self.key_id,
                                         tenseal_context=_load_tenseal_context(raw), raw=raw)
        return self._public

    def _encryption_bytes(self) -> bytes:
        if self._symmetric:
            return self._tenseal_bytes()
        if self._enc_raw is None:  # workers only need the public key
            self._enc_raw = self.public_context()._tenseal_bytes()
        return self._enc_raw


def generate_keys(preset: str | HEPreset = DEFAULT_PRESET, *, mode: str = "clients") -> SecretKeys:
    """Fresh keys for ``preset``.

    ``mode="clients"``: the cooperatives share these keys (symmetric encryption
    unless the preset says ``encryption="asymmetric"``). ``mode="custodian"``:
    only the custodian keeps them; everyone else gets :meth:`SecretKeys.public_context`.
    Keys come from the OS's randomness (TenSEAL exposes no seed); in simulation,
    generate them once and share the bytes (see :func:`load_or_generate_keys`).
    """
    p = get_preset(preset)
    if mode not in _MODES:
        raise HEError(f"secure.key_holder must be one of {_MODES}, not {mode!r}")
    symmetric = mode == "clients" and p.encryption == "auto"
    ctx = _tenseal_context(p, symmetric)
    return SecretKeys(preset=p, mode=mode, key_id=os.urandom(8), tenseal_context=ctx)


def load_or_generate_keys(path: str | Path, *, preset: str | HEPreset = DEFAULT_PRESET,
                          mode: str = "clients") -> SecretKeys:
    """Keys stored at ``path``, generated there first if missing (race-free across processes).

    For simulations, where the cooperatives of one run share a machine: the
    first client to get here writes the keys (file mode 0600), the others read
    them. Keep ``path`` out of the aggregator's reach in a real deployment.
    """
    path = Path(path)
    if not path.exists():
        keys = generate_keys(preset, mode=mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(keys.to_bytes())
        try:
            os.link(tmp, path)  # atomic; fails if another process won the race
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    keys = SecretKeys.from_bytes(path.read_bytes())
    want = get_preset(preset)
    if keys.preset.fingerprint() != want.fingerprint() or keys.mode != mode:
        raise HEError(f"{path}: holds keys for preset {keys.preset.name!r} in mode {keys.mode!r}, "
                      f"not {want.name!r} in mode {mode!r}")
    return keys
