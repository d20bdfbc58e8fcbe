"""A cancellation (SIGTERM, a draining gateway) that arrives in the loop turn in which the handshake
completes is not lost: Python 3.11's ``asyncio.wait_for`` returns the result and drops it, which once
left ``iscl client`` running after SIGTERM."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import iscl_hsm
from iscl_hsm.transport import aio
from iscl_hsm.transport.common import Timeouts

SAFETY_NET = 10.0
"""Seconds to wait for the cancelled link to end: a guard against a hang, never a timing assertion."""


class FinishingStream:
    """Just what the handshake bound needs of a stream: a handshake that ends when ``done`` is set."""

    peer = ("192.0.2.1", 104)
    timeouts = Timeouts(handshake=30.0)

    def __init__(self, done: asyncio.Future[str]) -> None:
        self.done = done

    async def handshake(self) -> str:
        return await self.done


async def link_cancelled_as_its_handshake_ends() -> bool:
    """Whether the link was cancelled (asyncio.run would cancel it anyway on its way out)."""
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def link() -> None:
        await aio._handshake_within(FinishingStream(done))  # type: ignore[arg-type]
        await asyncio.Event().wait()  # the link runs on, as `iscl client` relays its input

    task = asyncio.create_task(link())
    await asyncio.sleep(0)  # the task now waits for the handshake
    done.add_done_callback(lambda _: task.cancel())  # runs right after the handshake's own wake-up
    done.set_result("link parameters")
    await asyncio.wait({task}, timeout=SAFETY_NET)
    return task.cancelled()


def test_a_cancel_in_the_turn_the_handshake_ends_still_cancels() -> None:
    assert asyncio.run(link_cancelled_as_its_handshake_ends())


def test_no_module_bounds_its_waits_with_wait_for() -> None:
    """The rule of docs/architecture.md: asyncio.timeout, never asyncio.wait_for (see above)."""
    found = [
        f"{path.name}:{node.lineno}"
        for path in Path(iscl_hsm.__file__).parent.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute) and node.attr == "wait_for"
        or isinstance(node, ast.alias) and node.name == "wait_for"
    ]
    assert not found, f"asyncio.wait_for can drop a cancellation; use asyncio.timeout: {found}"
