"""A private RabbitMQ node for tests, the demo and the bench: the Debian package's own script, run as us.

The wrapper on the PATH switches to the ``rabbitmq`` user, who cannot write to a temp dir, so
this starts ``rabbitmq-server`` from the package's lib folder with its own Erlang port mapper,
node port, distribution port and node name (parallel runs and other brokers on the machine
do not clash), in a directory of its own, with no plugins. Readiness is its own "Server
startup complete" line, not a sleep. It ends by PID (its own process group).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from pathlib import Path

__all__ = ["START_TIMEOUT", "RabbitServer", "rabbitmq_script"]

#: Seconds the broker may take to start (about 6 s here; the first start of a node writes its database).
START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rabbitmq_script() -> str | None:
    """The package's own start script, or ``None`` when rabbitmq-server is not installed."""
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"))
    return found[-1] if found else None


class RabbitServer:
    """One RabbitMQ node in a private directory; ``kill`` and ``start`` again keep its data and port."""

    def __init__(self, script: str, directory: Path, *, tls: tuple[Path, Path, Path] | None = None) -> None:
        """Pick free ports and write the node's config; ``tls`` (CA, certificate, key) adds an
        ``amqps`` listener on ``tls_port`` that requires a client certificate from that CA."""
        self.script = script
        self.directory = directory
        self.port = _free_port()
        self.tls_port = _free_port() if tls is not None else 0
        self.dist_port = _free_port()
        self.epmd_port = _free_port()
        self.node = f"mtp{uuid.uuid4().hex[:10]}@localhost"
        self._proc: subprocess.Popen[str] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.log: list[str] = []
        (directory / "enabled_plugins").write_text("")
        # Loopback only; the guest user may connect (it can only from loopback anyway).
        conf = f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        if tls is not None:
            ca, cert, key = tls
            conf += (
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\nssl_options.keyfile = {key}\n"
                "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
            )
        (directory / "rabbitmq.conf").write_text(conf)

    @property
    def url(self) -> str:
        """The AMQP URL of this broker (guest, loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        d = self.directory
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(d),  # the Erlang cookie is written here
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            # The Erlang distribution listener binds every interface unless told otherwise, and
            # rabbitmq.conf cannot say so before it starts: erl reads ERL_AFLAGS itself.
            "ERL_AFLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "no-env.conf"),
        }

    def start(self) -> None:
        """Start the node (and its port mapper) and wait, bounded, for "Server startup complete"."""
        if self._epmd is None:
            epmd = shutil.which("epmd") or "/usr/bin/epmd"  # installed with the Erlang runtime
            self._epmd = subprocess.Popen(  # noqa: S603  (fixed arguments of our own)
                [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        proc = subprocess.Popen(  # noqa: S603  (the package's script, found by rabbitmq_script)
            [self.script],
            env=self._env(),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so kill() ends the script and beam
        )
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.log.append(line)
                if "Server startup complete" in line:
                    ready.set()

        reader = threading.Thread(target=read, name="rabbitmq-log", daemon=True)
        reader.start()
        self._proc, self._reader = proc, reader
        if not ready.wait(START_TIMEOUT):
            self.kill()
            raise RuntimeError("rabbitmq-server did not start:\n" + "".join(self.log[-30:]))

    def kill(self) -> None:
        """End the node abruptly (SIGKILL to its process group, by PID), as a crash would."""
        proc, reader = self._proc, self._reader
        self._proc = self._reader = None
        if proc is None or reader is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=START_TIMEOUT)
        reader.join(timeout=START_TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()

    def close(self) -> None:
        """Kill the node and its port mapper."""
        self.kill()
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            epmd.kill()
            epmd.wait(timeout=START_TIMEOUT)
