"""TLS contexts: a listener's certificate and the upstream client's, each swapped in live on change or SIGHUP.

A failed ``load_cert_chain`` can leave a context holding the new certificate with the old key,
so a reload never touches the context in use: it builds a complete new one. On a listener, the
listening context's SNI callback (called by OpenSSL for every handshake, with or without SNI)
hands each new handshake to the newest good context; towards the upstream, each new connection
takes the newest good context (:class:`ClientCertReloader`). Established connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from typing import Final

from mes_trace_proxy.config import ConfigError, ServerTls, UpstreamTls

__all__ = ["POLL_INTERVAL", "CertReloader", "ClientCertReloader", "client_context", "server_context"]

log = logging.getLogger("mes_trace_proxy.tls")

# cert-manager and Kubernetes secret volumes update files within about a minute of a
# renewal (the kubelet sync period); a stat of two files every 5 s costs nothing and picks
# a new certificate up long before the old one expires.
POLL_INTERVAL: Final = 5.0


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key and hang.
    raise ValueError("encrypted private keys are not supported")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    if isinstance(exc, OSError):
        return exc.strerror or exc.__class__.__name__
    return str(exc)


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """A server context holding the listener's certificate chain and key.

    Raises:
        ConfigError: naming the TLS key when a file cannot be read or the pair is unusable.
    """
    # Purpose.CLIENT_AUTH: the server side of the defaults (TLS 1.2+, no compression,
    # OpenSSL's secure cipher list).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # aiohttp's server speaks HTTP/1.1 only; saying so stops clients from offering h2.
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            tls.source, f"cannot use {tls.cert_file} with {tls.key_file}: {_describe(exc)}"
        ) from None
    return context


def client_context(tls: UpstreamTls) -> ssl.SSLContext:
    """The context for connections to an https:// upstream: CA bundle, verification, client certificate.

    Raises:
        ConfigError: naming the upstream TLS key when a file is unusable.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(tls.source, f"cannot build the upstream TLS context: {_describe(exc)}") from None
    return context


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten: inode, size, modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class _Watched:
    """Files that are loaded again on :meth:`reload` (SIGHUP) and when a poll sees them change."""

    def __init__(self, name: str, paths: tuple[str, ...], interval: float) -> None:
        self._name = name
        self._paths = paths
        self._interval = interval
        self._stamps = self._file_stamps()
        self._task: asyncio.Task[None] | None = None
        #: successful reloads, for tests and logs
        self.generation = 0

    def _file_stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_stamp(path) for path in self._paths)

    def reload(self) -> bool:
        """Load the files again; on success new connections use them (subclasses say how)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start watching the files (call inside the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name=f"tls-reload:{self._name}"
            )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._file_stamps() != self._stamps:
                self.reload()

    async def aclose(self) -> None:
        """Stop watching."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class CertReloader(_Watched):
    """Serves one listener's certificate and keeps it current.

    ``context`` is what the listener's socket is given; :meth:`reload` (SIGHUP) and the
    poller started by :meth:`start` replace what new handshakes get. A new pair that fails
    to load is logged and the current one stays.
    """

    def __init__(self, listener: str, tls: ServerTls, *, interval: float = POLL_INTERVAL) -> None:
        """Load the pair once (raising on failure) and hook the swap into the handshake.

        Raises:
            ConfigError: the files are unusable at start-up.
        """
        super().__init__(listener, (tls.cert_file, tls.key_file), interval)
        self._listener = listener
        self._tls = tls
        self.context: Final = server_context(tls)
        self._current = self.context
        self.context.sni_callback = self._pick

    def _pick(self, ssl_object: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
        current = self._current
        if current is not self.context:
            ssl_object.context = current

    def reload(self) -> bool:
        """Load the files again; on success new handshakes use them.

        Returns:
            Whether the new pair is in use.
        """
        self._stamps = self._file_stamps()
        try:
            fresh = server_context(self._tls)
        except ConfigError as exc:
            log.error(
                "TLS certificate reload failed; keeping the current certificate",
                extra={"listener": self._listener, "source": self._tls.source, "error": exc.message},
            )
            return False
        self._current = fresh
        self.generation += 1
        log.info(
            "TLS certificate reloaded", extra={"listener": self._listener, "generation": self.generation}
        )
        return True


class ClientCertReloader(_Watched):
    """The context for one listener's https:// upstream, kept current: CA bundle and client certificate.

    Whoever connects reads :attr:`context` for each new connection; :meth:`reload` (SIGHUP) and
    the poller started by :meth:`start` replace it when the files change. A set of files that
    fails to load (a half-written rotation, a certificate with another's key) is logged and the
    current context stays. Connections already open keep the certificate they were made with.
    """

    def __init__(self, listener: str, tls: UpstreamTls, *, interval: float = POLL_INTERVAL) -> None:
        """Build the context once (raising on failure).

        Raises:
            ConfigError: the files are unusable at start-up.
        """
        paths = tuple(path for path in (tls.ca_file, tls.cert_file, tls.key_file) if path is not None)
        super().__init__(f"{listener}-upstream", paths, interval)
        self._listener = listener
        self._tls = tls
        #: the newest good context: what a new upstream connection is made with
        self.context = client_context(tls)

    def reload(self) -> bool:
        """Load the files again; on success new upstream connections use them.

        Returns:
            Whether the new files are in use.
        """
        self._stamps = self._file_stamps()
        try:
            fresh = client_context(self._tls)
        except ConfigError as exc:
            log.error(
                "upstream TLS reload failed; keeping the current client certificate",
                extra={"listener": self._listener, "source": self._tls.source, "error": exc.message},
            )
            return False
        self.context = fresh
        self.generation += 1
        log.info(
            "upstream TLS client certificate reloaded",
            extra={"listener": self._listener, "generation": self.generation},
        )
        return True
