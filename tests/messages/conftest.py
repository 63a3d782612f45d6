"""A real RabbitMQ broker for the message-path tests, and helpers that make real dead letters.

The broker is the Debian package's own ``rabbitmq-server`` script from its lib folder (the
wrapper on the PATH switches to the ``rabbitmq`` user, who cannot write to a temp dir), with
its own Erlang port mapper, node port, distribution port and node name, so parallel runs and
other brokers on the machine do not clash. Readiness is its own "Server startup complete"
line, not a sleep. Ends by PID (its process group, which it alone is in).
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

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

    def __init__(self, script: str, directory: Path) -> None:
        self.script = script
        self.directory = directory
        self.port = _free_port()
        self.dist_port = _free_port()
        self.epmd_port = _free_port()
        self.node = f"mtp{uuid.uuid4().hex[:10]}@localhost"
        self._proc: subprocess.Popen[str] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.log: list[str] = []
        (directory / "enabled_plugins").write_text("")
        # Loopback only; the guest user may connect (it can only from loopback anyway).
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )

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
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "no-env.conf"),
        }

    def start(self) -> None:
        """Start the node (and its port mapper) and wait, bounded, for "Server startup complete"."""
        if self._epmd is None:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        proc = subprocess.Popen(
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


def _script_or_skip() -> str:
    script = rabbitmq_script()
    if script is None:
        if os.environ.get("CI"):
            pytest.fail(
                "rabbitmq-server is not installed, and CI must run the RabbitMQ tests: make system-deps"
            )
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server, or make system-deps)")
    return script


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """One broker for the session; tests isolate themselves by unique queue and exchange names."""
    server = RabbitServer(_script_or_skip(), tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A broker of the test's own, for tests that kill and restart it."""
    server = RabbitServer(_script_or_skip(), tmp_path_factory.mktemp("rabbitmq-own"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@dataclass(frozen=True)
class Topology:
    """A private copy of the reference topology: names carry a unique suffix."""

    commands: str  # direct exchange
    dlx: str  # fanout dead-letter exchange
    price_requests: str  # work queue, dead-letters to dlx
    dead_letters: str  # the dead-letter queue
    small: str  # a work queue holding one message (x-max-length 1)


async def declare_topology(channel: AbstractChannel, *, durable: bool = False) -> Topology:
    """Declare the reference topology under unique names, as the CRM/MES side would."""
    tag = uuid.uuid4().hex[:8]
    topo = Topology(
        commands=f"mes.commands.{tag}",
        dlx=f"mes.dlx.{tag}",
        price_requests=f"mes.price.requests.{tag}",
        dead_letters=f"mes.dead-letters.{tag}",
        small=f"mes.small.{tag}",
    )
    commands = await channel.declare_exchange(topo.commands, aio_pika.ExchangeType.DIRECT, durable=durable)
    dlx = await channel.declare_exchange(topo.dlx, aio_pika.ExchangeType.FANOUT, durable=durable)
    dead = await channel.declare_queue(topo.dead_letters, durable=durable)
    await dead.bind(dlx)
    work = await channel.declare_queue(
        topo.price_requests, durable=durable, arguments={"x-dead-letter-exchange": topo.dlx}
    )
    await work.bind(commands, routing_key="price.calculate")
    small = await channel.declare_queue(
        topo.small, durable=durable, arguments={"x-dead-letter-exchange": topo.dlx, "x-max-length": 1}
    )
    await small.bind(commands, routing_key="order.approved")
    return topo


@pytest.fixture
async def amqp_channel(rabbitmq: RabbitServer) -> AsyncIterator[AbstractChannel]:
    """A channel on the session broker, closed after the test."""
    connection = await aio_pika.connect(rabbitmq.url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()
