"""`Security`: the credential of a dask-rs cluster.

A dask-rs cluster is protected by a token (64 hex digits) that every
connection proves in its handshake, without sending it. ``dask-ctl up``
makes one per cluster and keeps it in the cluster's registry directory
(``Client("NAME")`` finds it); ``LocalCluster`` makes one per cluster and
hands it to its workers and to ``Client(cluster)``. Other processes find a
token in ``DASK_RS_TOKEN`` or in the file named by ``DASK_RS_TOKEN_FILE``.
"""

from __future__ import annotations

import os


class Security:
    """Credentials to connect with: ``Security(token=...)``, or
    ``Security.temporary()`` for a fresh random token.

    ``Security.from_file(path)`` reads a token file (such as
    ``~/.local/state/dask-rs/clusters/NAME/token``). TLS certificates
    (distributed's ``tls_ca_file``, ``tls_client_cert``, ``tls_client_key``)
    are not accepted: a dask-rs cluster authenticates peers by its token.
    """

    def __init__(self, token: str | None = None, require_encryption: bool | None = None, **tls):
        if tls:
            raise TypeError(
                f"dask_rs.Security does not take {sorted(tls)}: dask-rs clusters authenticate with a "
                "cluster token (Security(token=...)), not TLS certificates"
            )
        if require_encryption:
            raise ValueError(
                "dask-rs connections are authenticated but not encrypted; require_encryption=True "
                "cannot be met"
            )
        if token is not None:
            from . import _core

            token = _core.check_token(token)
        self.token = token

    @classmethod
    def temporary(cls) -> Security:
        """A fresh random token (what ``LocalCluster`` uses)."""
        from . import _core

        return cls(token=_core.generate_token())

    @classmethod
    def from_file(cls, path) -> Security:
        """The token in ``path``, which must be private to its owner
        (`PermissionError` otherwise)."""
        from . import _core

        return cls(token=_core.read_token_file(os.fspath(path)))

    def __repr__(self) -> str:
        return f"Security(token={'<hidden>' if self.token else None})"


def token_of(security) -> str | None:
    """The token of ``security`` (a `Security`, or None for none)."""
    if security is None:
        return None
    if isinstance(security, Security):
        return security.token
    raise TypeError(f"security must be a dask_rs.Security, got {type(security).__name__}")
