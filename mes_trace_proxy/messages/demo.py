"""The demo's message path: a private broker, price requests over AMQP, an outage, dead letters, a re-drive.

``make demo`` runs it when ``rabbitmq-server`` is installed (else one line says how to turn it
on): the proxy gets ``--amqp-url`` and ``--dead-letter-queue mes.dead-letters``; the CRM side
sends price requests with a short TTL while MES is "down" (nothing consumes), so the broker
dead-letters them as expired; MES comes back and rejects one request it cannot read. The
summary lists the dead-lettered orders with their causes, as ``/orders/-/stuck`` gives them,
and shows one re-drive that MES then prices: the order is back on track.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final
from urllib.parse import quote

import aio_pika
import aiohttp
from aio_pika.abc import AbstractConnection

from mes_trace_proxy.sim import mes_amqp
from mes_trace_proxy.sim.rabbitmq import RabbitServer, rabbitmq_script

__all__ = ["HOW_TO_ENABLE", "MessageDemo", "MessageDemoResult", "message_summary_lines"]

HOW_TO_ENABLE: Final = (
    "Message path: off (install rabbitmq-server, e.g. `make system-deps`, "
    "to see dead letters traced and re-driven)"
)
#: Orders whose price requests are sent during the outage (they expire) and after it.
OUTAGE_ORDERS: Final = 4
LATER_ORDERS: Final = 4
#: The TTL of a price request sent during the outage: short, so the demo does not wait long.
OUTAGE_TTL_S: Final = 1.0
#: Bound on each wait for the proxy or MES: far above the seconds each step takes.
WAIT_S: Final = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDemoResult:
    """What the message path did in the demo."""

    broker: str
    sent: int
    dead_lettered: tuple[tuple[str, str], ...]  # (order id, cause)
    redriven: str | None = None
    redrive_outcome: str | None = None
    priced_after_redrive: bool = False
    problems: tuple[str, ...] = field(default_factory=tuple)


class MessageDemo:
    """Owns the demo's broker and its MES/CRM message sides."""

    def __init__(self, server: RabbitServer, directory: Path) -> None:
        self.server = server
        self._directory = directory
        self._connection: AbstractConnection | None = None

    @staticmethod
    def available() -> bool:
        """Whether rabbitmq-server is installed here."""
        return rabbitmq_script() is not None

    @classmethod
    async def start(cls) -> MessageDemo:
        """Start a private broker in a temporary directory and declare the reference topology."""
        script = rabbitmq_script()
        if script is None:
            raise RuntimeError("rabbitmq-server is not installed")
        directory = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="mes-demo-rabbitmq-"))
        server = RabbitServer(script, directory)
        demo = cls(server, directory)
        try:
            await asyncio.to_thread(server.start)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        try:
            demo._connection = await aio_pika.connect(server.url)
            await mes_amqp.declare_reference(await demo._connection.channel())
        except BaseException:
            await demo.close()
            raise
        return demo

    def proxy_flags(self) -> list[str]:
        """The proxy's command-line additions: the broker and the dead-letter queue (own mode)."""
        return ["--amqp-url", self.server.url, "--dead-letter-queue", mes_amqp.DEAD_LETTERS]

    async def close(self) -> None:
        """Close the connection, stop the broker (by PID) and remove its directory."""
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        await asyncio.to_thread(self.server.close)
        await asyncio.to_thread(shutil.rmtree, self._directory, True)

    async def run(self, session: aiohttp.ClientSession, admin: str) -> MessageDemoResult:
        """The outage, the dead letters, MES back, one reject, one re-drive; read back from the proxy."""
        assert self._connection is not None
        channel = await self._connection.channel()
        pricer = mes_amqp.MesPricer(channel)
        outage = [f"ORD-MQ-{n:04d}" for n in range(1, OUTAGE_ORDERS + 1)]
        later = [f"ORD-MQ-{n:04d}" for n in range(OUTAGE_ORDERS + 1, OUTAGE_ORDERS + LATER_ORDERS + 1)]
        broken = later[-1]
        problems: list[str] = []
        # MES is down: nothing consumes, the requests expire and are dead-lettered.
        await mes_amqp.send_price_requests(channel, outage, ttl_s=OUTAGE_TTL_S)
        await _wait_flagged(session, admin, len(outage))
        # MES is back: it prices the later requests, and rejects the one without a model.
        await pricer.start()
        await mes_amqp.send_price_requests(channel, later, ttl_s=30.0, malformed=[broken])
        expected = len(outage) + 1
        flagged = await _wait_flagged(session, admin, expected)
        if len(flagged) < expected:
            problems.append(f"the proxy showed {len(flagged)} dead-lettered orders, expected {expected}")
        result = MessageDemoResult(
            broker=self.server.url.rpartition("@")[2],
            sent=len(outage) + len(later),
            dead_lettered=tuple(flagged),
        )
        if not flagged:
            return replace(result, problems=tuple(problems))
        order_id = outage[0]
        async with session.post(f"{admin}/orders/{quote(order_id, safe='')}/redrive") as answer:
            outcome = str((await answer.json(content_type=None)).get("outcome", answer.status))
        priced = await pricer.wait_priced(order_id, within=WAIT_S)
        if not priced:
            problems.append(f"MES did not price {order_id} after its re-drive")
        return replace(
            result,
            redriven=order_id,
            redrive_outcome=outcome,
            priced_after_redrive=priced,
            problems=tuple(problems),
        )


async def _wait_flagged(session: aiohttp.ClientSession, admin: str, expected: int) -> list[tuple[str, str]]:
    """Poll ``/orders/-/stuck`` (bounded) until ``expected`` orders carry a dead letter."""
    deadline = time.monotonic() + WAIT_S
    found: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        async with session.get(f"{admin}/orders/-/stuck", params={"limit": "500"}) as answer:
            doc = await answer.json(content_type=None) if answer.status == 200 else {}
        found = [
            (str(item["order_id"]), str(item["dead_letter"]["cause"]))
            for item in doc.get("orders", [])
            if isinstance(item, dict) and item.get("dead_letter")
        ]
        if len(found) >= expected:
            break
        await asyncio.sleep(0.25)
    return sorted(found)


def message_summary_lines(result: MessageDemoResult | None) -> Sequence[str]:
    """The summary's message-path lines (or the one line that says how to turn it on)."""
    if result is None:
        return [HOW_TO_ENABLE]
    lines = [
        f"Message path (RabbitMQ {result.broker}): {result.sent} price requests over AMQP, "
        f"{len(result.dead_lettered)} dead-lettered"
    ]
    lines += [f"  {order_id}  {cause}" for order_id, cause in result.dead_lettered]
    if result.redriven is not None:
        back = "MES priced it: back on track" if result.priced_after_redrive else "MES has not priced it"
        lines.append(f"  re-drive {result.redriven}: {result.redrive_outcome}; {back}")
    return lines
