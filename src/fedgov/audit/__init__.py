"""A tamper-evident, signed audit trail for a run: ``audit.jsonl`` in the run directory.

- ``fedgov.audit.log``: the record format; ``AuditLog`` writes it, ``read_chain`` reads it back.
- ``fedgov.audit.verify``: ``verify`` checks the chain, the rounds the records claim, a
  witness of the last record's hash, and the rest of the run directory.
- ``python -m fedgov.audit verify|trace`` (``fedgov.audit.__main__``): the command line,
  above this package and ``fedgov.governance.trace``, which both import only downwards.
"""

from .log import (
    GENESIS,
    LOG_NAME,
    PUBLIC_KEY_NAME,
    AuditError,
    AuditLog,
    Chain,
    VerifyResult,
    canonical_json,
    digest_arrays,
    digest_bytes,
    read_chain,
)
from .verify import verify

__all__ = [
    "AuditError",
    "AuditLog",
    "Chain",
    "VerifyResult",
    "verify",
    "read_chain",
    "digest_bytes",
    "digest_arrays",
    "canonical_json",
    "LOG_NAME",
    "PUBLIC_KEY_NAME",
    "GENESIS",
]
