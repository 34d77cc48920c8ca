"""`Security`: the credentials of a dask-rs cluster.

A dask-rs cluster is protected by a token (64 hex digits) that every
connection proves in its handshake, without sending it, and optionally by
TLS 1.3 with mutual authentication: every process presents a certificate
signed by the cluster's CA and accepts only peers that do, and everything on
the wire is encrypted (``tls://`` addresses). ``dask-ctl up`` makes a token
per cluster and keeps it in the cluster's registry directory
(``Client("NAME")`` finds it); ``LocalCluster`` makes one per cluster and
hands it to its workers and to ``Client(cluster)``. Other processes find a
token in ``DASK_RS_TOKEN`` or in the file named by ``DASK_RS_TOKEN_FILE``,
and TLS files in ``DASK_RS_TLS_CA_FILE``, ``DASK_RS_TLS_CERT`` and
``DASK_RS_TLS_KEY``.
"""

from __future__ import annotations

import os
import tempfile

_TLS_FIELDS = (
    "tls_ca_file",
    "tls_client_cert",
    "tls_client_key",
    "tls_scheduler_cert",
    "tls_scheduler_key",
    "tls_worker_cert",
    "tls_worker_key",
)


class Security:
    """Credentials to connect with, as distributed spells them.

    - ``Security(token=...)``: a cluster token; ``Security.from_file(path)``
      reads one from a token file.
    - ``Security(tls_ca_file=, tls_client_cert=, tls_client_key=, ...)``:
      TLS 1.3 with the cluster's CA; each role (client, scheduler, worker)
      uses its own certificate and key when given, else the client's. A key
      may live in the certificate file. With TLS, connections are encrypted
      and plain ``tcp://`` addresses are refused.
    - ``require_encryption=True``: refuse unencrypted connections (and so
      needs TLS files).
    - ``Security.temporary()``: a fresh token and a fresh CA with one
      certificate, in a private temporary directory (what distributed's
      ``Security.temporary()`` gives: an encrypted ``tls://`` cluster).
    """

    def __init__(self, token: str | None = None, require_encryption: bool | None = None, **tls):
        unknown = sorted(set(tls) - set(_TLS_FIELDS))
        if unknown:
            raise TypeError(
                f"dask_rs.Security does not take {unknown}: it takes token=, require_encryption= and "
                f"{', '.join(f + '=' for f in _TLS_FIELDS)} (TLS 1.3 only, with its own cipher suites)"
            )
        if token is not None:
            from . import _core

            token = _core.check_token(token)
        self.token = token
        for f in _TLS_FIELDS:
            value = tls.get(f)
            setattr(self, f, os.fspath(value) if value is not None else None)
        has_cert = any(getattr(self, f) for f in _TLS_FIELDS if f.endswith("_cert"))
        if has_cert and not self.tls_ca_file:
            raise ValueError("TLS certificates need tls_ca_file= (the cluster's CA certificate)")
        if self.tls_ca_file and not has_cert:
            raise ValueError("tls_ca_file= needs a certificate too (tls_client_cert=, ...)")
        self.require_encryption = bool(require_encryption) or bool(self.tls_ca_file)
        if self.require_encryption and not self.tls_ca_file:
            raise ValueError("require_encryption=True needs TLS files (tls_ca_file=, tls_client_cert=, ...)")

    @classmethod
    def temporary(cls) -> Security:
        """A fresh token and a fresh CA and certificate (an encrypted cluster).
        The files live in a private temporary directory for this process's
        lifetime."""
        from . import _core

        d = tempfile.mkdtemp(prefix="dask-rs-tls-")
        _temporary_dirs.append(d)
        ca, cert, key = _core.generate_tls(d)
        return cls(token=_core.generate_token(), tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key)

    @classmethod
    def token_only(cls) -> Security:
        """A fresh random token and no TLS (what ``LocalCluster`` uses by
        default: authenticated, not encrypted, on loopback)."""
        from . import _core

        return cls(token=_core.generate_token())

    @classmethod
    def from_file(cls, path) -> Security:
        """The token in ``path``, which must be private to its owner
        (`PermissionError` otherwise)."""
        from . import _core

        return cls(token=_core.read_token_file(os.fspath(path)))

    @classmethod
    def from_directory(cls, path) -> Security | None:
        """The credentials ``dask-ctl up`` keeps for a cluster: ``token`` and,
        unless the cluster runs with ``--no-tls``, ``ca.pem``, ``cert.pem`` and
        ``key.pem`` in ``path`` (the cluster's registry directory, or a private
        copy of those files on another machine). None when ``path`` holds no
        token (a cluster started with ``--insecure``)."""
        path = os.fspath(path)
        token = os.path.join(path, "token")
        if not os.path.exists(token):
            return None
        tok = cls.from_file(token).token
        ca, cert, key = (os.path.join(path, f) for f in ("ca.pem", "cert.pem", "key.pem"))
        if not os.path.exists(ca):
            return cls(token=tok)
        return cls(token=tok, tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key)

    def to_directory(self, path) -> str:
        """Write these credentials as ``from_directory`` reads them (``token``,
        and for TLS ``ca.pem``, ``cert.pem``, ``key.pem`` copied from the
        client's files) into ``path``, created private (0700) if missing;
        the token and key are 0600. Returns ``path``. For tools that take a
        credentials directory, as ``dask-ctl tui --credentials DIR``."""
        path = os.fspath(path)
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{path} must be a directory of yours that others cannot read")

        def write(name, data: bytes, mode):
            target = os.path.join(path, name)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(target, mode)

        if not self.token:
            raise ValueError("these credentials have no token to write")
        write("token", (self.token + "\n").encode(), 0o600)
        tls = self.tls_for("client")
        if tls:
            for name, src, mode in zip(("ca.pem", "cert.pem", "key.pem"), tls, (0o644, 0o644, 0o600)):
                with open(src, "rb") as f:
                    write(name, f.read(), mode)
        return path

    def tls_for(self, role: str = "client") -> tuple[str, str, str] | None:
        """(CA, certificate, key) files for ``role`` ("client", "scheduler"
        or "worker"), or None without TLS."""
        if not self.tls_ca_file:
            return None
        order = [role] + [r for r in ("client", "scheduler", "worker") if r != role]
        for r in order:
            cert = getattr(self, f"tls_{r}_cert", None)
            if cert:
                return (self.tls_ca_file, cert, getattr(self, f"tls_{r}_key", None) or cert)
        return None

    def core_kwargs(self, role: str = "client") -> dict:
        """The keyword arguments dask_rs._core takes for these credentials."""
        return {"token": self.token, "tls": self.tls_for(role), "require_encryption": self.require_encryption}

    def worker_env(self) -> dict:
        """Environment variables that hand these credentials to a worker
        process (file names and the token; nothing on its command line)."""
        env = {}
        if self.token:
            env["DASK_RS_TOKEN"] = self.token
        tls = self.tls_for("worker")
        if tls:
            env["DASK_RS_TLS_CA_FILE"], env["DASK_RS_TLS_CERT"], env["DASK_RS_TLS_KEY"] = tls
        return env

    def __repr__(self) -> str:
        tls = f", tls_ca_file={self.tls_ca_file!r}" if self.tls_ca_file else ""
        return f"Security(token={'<hidden>' if self.token else None}{tls})"


_temporary_dirs: list = []


def _cleanup():
    import shutil

    for d in _temporary_dirs:
        shutil.rmtree(d, ignore_errors=True)


import atexit  # noqa: E402

atexit.register(_cleanup)


def check(security) -> Security | None:
    """``security`` itself (a `Security`, or None for none), or TypeError."""
    if security is None or isinstance(security, Security):
        return security
    raise TypeError(f"security must be a dask_rs.Security, got {type(security).__name__}")


def token_of(security) -> str | None:
    """The token of ``security`` (a `Security`, or None for none)."""
    s = check(security)
    return s.token if s else None
