"""Tests for the private RabbitMQ node (mes_trace_proxy/sim/rabbitmq.py), against the real broker.

The session broker (tests/rabbitmq.py) serves the read-only checks; the tests that kill or close
a node use one of their own. Processes are found by what only this node's have: the node name in
their environment (the script, beam and its helpers inherit it) and the port mapper's own port on
its command line, so "no process left" is checked PID by PID.
"""

from __future__ import annotations

import glob
import os
import select
import socket
import stat
from pathlib import Path

import aio_pika
import pytest

from mes_trace_proxy.sim import rabbitmq as rabbitmq_module
from mes_trace_proxy.sim.rabbitmq import RabbitServer, rabbitmq_script
from tests.rabbitmq import WAIT_S, script_or_skip

#: What connecting to a port nobody serves on that address says (refused; or no IPv6 loopback at all).
NOTHING_THERE = "refused|assign requested address|unreachable"


def _accepts(host: str, port: int, family: socket.AddressFamily = socket.AF_INET) -> bool:
    """Whether something listens on ``host:port`` (a refused connection says nothing does)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT_S)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return False
        return True


def _processes(server: RabbitServer) -> tuple[set[int], set[int]]:
    """This node's running processes (zombies waiting for a reaper do not count): those of the
    node itself (script, beam and its helpers) and its port mapper."""
    marker = f"RABBITMQ_NODENAME={server.node}".encode()
    epmd_port = f"-port\0{server.epmd_port}\0".encode()
    node: set[int] = set()
    epmd: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes() + b"\0"
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # ended meanwhile, or another user's process
        if marker in environ.split(b"\0"):
            node.add(int(entry.name))
        elif b"epmd" in cmdline and epmd_port in cmdline:
            epmd.add(int(entry.name))
    return node, epmd


def _ended(pids: set[int], within: float = WAIT_S) -> bool:
    """Whether every process in ``pids`` ends within ``within`` seconds, waited for by event (a
    pidfd turns readable when its process exits): beam is the script's child, not ours, and may
    still be exiting when the script has been reaped."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            readable, _, _ = select.select([fd], [], [], within)
        finally:
            os.close(fd)
        if not readable:
            return False
    return True


async def _round_trip(url: str, queue_name: str, payload: bytes) -> bytes:
    """Publish ``payload`` to a fresh queue and read it back: the node really speaks AMQP."""
    connection = await aio_pika.connect(url, timeout=WAIT_S)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(payload), routing_key=queue_name)
        got = await queue.get(timeout=WAIT_S, fail=True)
        assert got is not None
        await got.ack()
        return got.body
    finally:
        await connection.close()


# ── rabbitmq_script ──────────────────────────────────────────────────────────────────────────


def test_rabbitmq_script_is_the_packages_own_executable() -> None:
    script = script_or_skip()
    path = Path(script)
    assert path.name == "rabbitmq-server"
    assert path.parent.name == "sbin"
    # The package's lib copy, not the /usr/sbin wrapper that switches to the rabbitmq user.
    assert path.is_relative_to("/usr/lib/rabbitmq/lib")
    assert path.parent.parent.name.startswith("rabbitmq_server-")
    mode = path.stat().st_mode
    assert stat.S_ISREG(mode)
    assert mode & stat.S_IXUSR


def test_rabbitmq_script_is_none_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # No rabbitmq_server-* folder: the glob finds nothing (what a machine without the package sees).
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    assert rabbitmq_script() is None


def test_rabbitmq_script_takes_the_last_of_several_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = "/usr/lib/rabbitmq/lib/rabbitmq_server-{}/sbin/rabbitmq-server"
    monkeypatch.setattr(glob, "glob", lambda pattern: [lib.format("3.9.2"), lib.format("3.8.1")])
    assert rabbitmq_script() == lib.format("3.9.2")


# ── a started node ───────────────────────────────────────────────────────────────────────────


async def test_a_started_node_speaks_amqp_on_its_port(rabbitmq: RabbitServer) -> None:
    assert rabbitmq.url == f"amqp://guest:guest@127.0.0.1:{rabbitmq.port}/"
    assert await _round_trip(rabbitmq.url, "simtests.round-trip", b"hello broker") == b"hello broker"


def test_a_started_node_listens_on_127_0_0_1_only(rabbitmq: RabbitServer) -> None:
    """AMQP, the port mapper and the Erlang distribution port: loopback only."""
    for port in (rabbitmq.port, rabbitmq.epmd_port, rabbitmq.dist_port):
        assert _accepts("127.0.0.1", port), port
        # Another loopback address reaches every socket bound to 0.0.0.0: none answers here.
        assert not _accepts("127.0.0.2", port), port
    if socket.has_ipv6:
        with (
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock,
            pytest.raises(OSError, match=NOTHING_THERE),
        ):
            sock.connect(("::1", rabbitmq.port))


def test_nodes_get_their_own_ports_and_name(rabbitmq: RabbitServer, tmp_path: Path) -> None:
    other = RabbitServer(script_or_skip(), tmp_path)  # not started: the constructor picks and writes
    ports = {other.port, other.dist_port, other.epmd_port}
    assert len(ports) == 3
    assert ports.isdisjoint({rabbitmq.port, rabbitmq.dist_port, rabbitmq.epmd_port})
    assert other.node != rabbitmq.node
    assert other.node.endswith("@localhost")
    assert other.tls_port == 0
    conf = (tmp_path / "rabbitmq.conf").read_text()
    assert f"listeners.tcp.default = 127.0.0.1:{other.port}\n" in conf
    assert "ssl" not in conf
    assert (tmp_path / "enabled_plugins").read_text() == ""  # no plugins


async def test_kill_then_start_keeps_data_and_port(own_rabbitmq: RabbitServer) -> None:
    port, node = own_rabbitmq.port, own_rabbitmq.node
    connection = await aio_pika.connect(own_rabbitmq.url, timeout=WAIT_S)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("simtests.kept", durable=True)
        message = aio_pika.Message(b"survives a crash", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key=queue.name)  # confirmed: on disk
    finally:
        await connection.close()
    node_pids, epmd_pids = _processes(own_rabbitmq)
    assert len(node_pids) >= 2  # the script and beam at least
    assert len(epmd_pids) == 1

    own_rabbitmq.kill()  # as a crash would
    assert _ended(node_pids)
    assert _processes(own_rabbitmq) == (set(), epmd_pids)  # the port mapper stays: start() reuses it
    assert not _ended(epmd_pids, within=0.0)
    assert _accepts("127.0.0.1", own_rabbitmq.epmd_port)
    assert not _accepts("127.0.0.1", port)
    assert not _accepts("127.0.0.1", own_rabbitmq.dist_port)
    own_rabbitmq.kill()  # a second kill is a no-op

    own_rabbitmq.start()
    assert (own_rabbitmq.port, own_rabbitmq.node) == (port, node)
    connection = await aio_pika.connect(own_rabbitmq.url, timeout=WAIT_S)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("simtests.kept", passive=True)
        got = await queue.get(timeout=WAIT_S, fail=True)
        assert got is not None
        assert got.body == b"survives a crash"
        await got.ack()
    finally:
        await connection.close()


def test_close_frees_the_ports_and_leaves_no_process(tmp_path: Path) -> None:
    server = RabbitServer(script_or_skip(), tmp_path)
    server.start()
    try:
        node_pids, epmd_pids = _processes(server)
        ports = (server.port, server.dist_port, server.epmd_port)
        assert len(node_pids) >= 2
        assert len(epmd_pids) == 1
        assert all(_accepts("127.0.0.1", port) for port in ports)
    finally:
        server.close()
    assert _ended(node_pids | epmd_pids)
    assert _processes(server) == (set(), set())
    assert not any(_accepts("127.0.0.1", port) for port in ports)
    for port in ports:  # free to bind again (as a server would, with SO_REUSEADDR)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
    server.close()  # closing twice is harmless


def test_a_node_that_does_not_start_fails_with_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "broken-rabbitmq-server"
    fake.write_text("#!/bin/sh\necho 'BOOT FAILED: no database here'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(rabbitmq_module, "START_TIMEOUT", 1.0)  # it never says it started
    server = RabbitServer(str(fake), tmp_path)
    try:
        with pytest.raises(RuntimeError, match="BOOT FAILED: no database here"):
            server.start()
        node_pids, epmd_pids = _processes(server)
        assert not node_pids
        assert len(epmd_pids) == 1  # only the port mapper, which close() ends
    finally:
        server.close()
    assert _processes(server) == (set(), set())
