"""Golden transcripts: whole links recorded frame by frame, and a replay of either end against them.

Each profile has a file here (``v1.00.json``, ``hardened.json``): for every suite, one link with fixed
keys, fixed challenges and random numbers, one message each way, a session-key variant, and a close,
as hex frames in the order they crossed the wire. ``test_transcripts.py`` replays each end of each link
against its file byte for byte, so any change to the wire shows up there.

``hardened.json`` was recorded from the engine before the profiles existed (the hardened profile is
that wire, unchanged). Regenerate a file only for a deliberate wire change, and say so in the commit::

    python3 -m tests.vectors.transcripts v1.00      # or: hardened
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iscl_hsm import wire
from iscl_hsm.engine import (
    ChallengeGuard,
    Config,
    Connection,
    Event,
    Md5Order,
    MessageReceived,
    Profile,
    Role,
    State,
)
from iscl_hsm.keyholder.memory import MemoryKeyHolder
from iscl_hsm.wire import Encryption, Mac
from tests.helpers import split_frames

HERE = Path(__file__).parent
KEYS = {
    "auth": {1: bytes.fromhex("0123456789ABCDEF"), 2: bytes.fromhex("1F1F1F1F0E0E0E0E")},
    "enc": {1: bytes.fromhex("FEDCBA9876543210"), 2: bytes.fromhex("E0FEE0FEF1FEF1FE")},
}
CLIENT_MESSAGE = bytes((i * 7 + 3) & 0xFF for i in range(37))  # three 16-byte blocks, the last short
SERVER_MESSAGE = bytes((i * 11 + 5) & 0xFF for i in range(16))  # one whole block
BLOCK = 16
ROLE_CODE = {Role.SERVER: "S", Role.CLIENT: "C"}


def path(profile: Profile) -> Path:
    return HERE / f"{profile.value}.json"


def _sequence(label: str) -> Iterator[bytes]:
    """A fixed stream of 8-byte values, different for every label."""
    for k in itertools.count():
        yield hashlib.sha256(f"{label}/{k}".encode()).digest()[:8]


@dataclass(frozen=True)
class LinkSpec:
    """One recorded link: its name and the settings both ends use."""

    name: str
    config: dict[str, Any]
    auth_data: dict[str, str]

    def make_config(self, profile: Profile, role: Role) -> Config:
        c = self.config
        return Config(
            profile=profile,
            encryption=Encryption[c["encryption"]],
            mac=Mac[c["mac"]],
            enc_key_id=c["enc_key_id"],
            max_block=c["max_block"],
            md5_order=Md5Order(c.get("md5_order", Md5Order.ENCRYPT_OUTPUT.value)),
            allow_unkeyed_md5=c.get("allow_unkeyed_md5", False),
            auth_data=self.auth_data[role.value].encode(),
        )


def specs(profile: Profile) -> list[LinkSpec]:
    """The links of one profile's file: every suite under key 1 and under session keys, and extras."""
    auth = {"server": "server-auth", "client": "client-auth"} if profile is Profile.HARDENED else {"server": "", "client": ""}
    out = []
    for key_id, enc, mac in itertools.product([1, wire.SESSION_KEYS], Encryption, Mac):
        name = f"{enc.name.lower()}/{mac.name.lower()}/key-{'session' if key_id == wire.SESSION_KEYS else key_id}"
        config: dict[str, Any] = {"encryption": enc.name, "mac": mac.name, "enc_key_id": key_id, "max_block": BLOCK}
        if profile is Profile.V100 and enc is Encryption.NONE and mac is Mac.MD5:
            config["allow_unkeyed_md5"] = True
        out.append(LinkSpec(name, config, auth))
    if profile is Profile.V100:
        for enc in Encryption:
            config = {"encryption": enc.name, "mac": "MD5", "enc_key_id": 1, "max_block": BLOCK,
                      "md5_order": Md5Order.ENCRYPT_RANDOM.value}
            out.append(LinkSpec(f"{enc.name.lower()}/md5-encrypt-random/key-1", config, auth))
        out.append(LinkSpec("des_cbc/des_mac/key-1/auth-data", {"encryption": "DES_CBC", "mac": "DES_MAC",
                            "enc_key_id": 1, "max_block": BLOCK}, {"server": "server-auth", "client": "client-auth"}))
    return out


def _holder(role: Role, challenges: Callable[[int], bytes]) -> MemoryKeyHolder:
    return MemoryKeyHolder(KEYS["auth"], KEYS["enc"], name=role.value, random=challenges)


def _taker(values: list[str]) -> Callable[[int], bytes]:
    """Hands out recorded 8-byte values in order."""
    queue = deque(bytes.fromhex(v) for v in values)

    def take(n: int) -> bytes:
        assert n == 8 and queue, "the engine asked for more random bytes than were recorded"
        return queue.popleft()

    return take


# --- recording ------------------------------------------------------------------------------------


def _recorder(label: str, log: list[str]) -> Callable[[int], bytes]:
    """Hands out :func:`_sequence` values and writes each one down."""
    stream = _sequence(label)

    def take(n: int) -> bytes:
        value = next(stream)
        log.append(value.hex())
        return value

    return take


def record(profile: Profile) -> dict[str, Any]:
    """Run every link of ``profile`` between two engines in lock step and write down the wire."""
    links = []
    for spec in specs(profile):
        used: dict[str, dict[str, list[str]]] = {r.value: {"challenges": [], "randoms": []} for r in Role}
        conns = {
            role: Connection(
                role,
                _holder(role, _recorder(f"{spec.name}/{role.value}/challenge", used[role.value]["challenges"])),
                spec.make_config(profile, role),
                guard=ChallengeGuard(),
                random=_recorder(f"{spec.name}/{role.value}/random", used[role.value]["randoms"]),
            )
            for role in Role
        }
        frames: list[str] = []
        conns[Role.SERVER].initiate()
        _lock_step(conns, frames)
        frames.append("C send")
        conns[Role.CLIENT].send_message(CLIENT_MESSAGE)
        _lock_step(conns, frames)
        frames.append("S send")
        conns[Role.SERVER].send_message(SERVER_MESSAGE)
        _lock_step(conns, frames)
        frames.append("C close")
        conns[Role.CLIENT].close()
        _lock_step(conns, frames)
        assert all(c.state is State.CLOSED for c in conns.values()), spec.name
        links.append({"name": spec.name, "config": spec.config, "auth_data": spec.auth_data,
                      "random": used, "frames": frames})
    return {
        "profile": profile.value,
        "keys": {purpose: {str(k): v.hex() for k, v in keys.items()} for purpose, keys in KEYS.items()},
        "messages": {"client": CLIENT_MESSAGE.hex(), "server": SERVER_MESSAGE.hex()},
        "links": links,
    }


def _lock_step(conns: dict[Role, Connection], frames: list[str]) -> None:
    """Deliver each end's output frame by frame, writing each down, until both are quiet."""
    moved = True
    while moved:
        moved = False
        for sender in Role:
            receiver = Role.CLIENT if sender is Role.SERVER else Role.SERVER
            for frame in split_frames(conns[sender].data_to_send()):
                frames.append(f"{ROLE_CODE[sender]} {frame.raw.hex()}")
                conns[receiver].receive_data(frame.raw)
                moved = True


# --- replaying ------------------------------------------------------------------------------------


def load(profile: Profile) -> dict[str, Any]:
    with path(profile).open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def replay(profile: Profile, link: dict[str, Any], role: Role) -> list[Event]:
    """Drive one end of a recorded link: feed it the peer's frames, check each of its own byte for byte.

    Returns the events the end reported. Raises AssertionError at the first frame that differs.
    """
    spec = LinkSpec(link["name"], link["config"], link["auth_data"])
    me = ROLE_CODE[role]
    conn = Connection(
        role,
        _holder(role, _taker(link["random"][role.value]["challenges"])),
        spec.make_config(profile, role),
        guard=ChallengeGuard(),
        random=_taker(link["random"][role.value]["randoms"]),
    )
    actions = {"send": lambda: conn.send_message(CLIENT_MESSAGE if role is Role.CLIENT else SERVER_MESSAGE),
               "close": conn.close}
    produced: deque[bytes] = deque()
    events: list[Event] = []

    def pull() -> None:
        while out := conn.data_to_send():
            produced.extend(frame.raw for frame in split_frames(out))
        conn.prepare()  # as the transports do: keys ahead, sealing ahead

    if role is Role.SERVER:
        conn.initiate()
    for index, entry in enumerate(link["frames"]):
        who, what = entry.split(" ")
        if what in actions:
            if who == me:
                actions[what]()
            continue
        frame = bytes.fromhex(what)
        if who != me:
            events += conn.receive_data(frame)
            continue
        if not produced:
            pull()
        assert produced, f"{link['name']}: frame {index} should come from the {role.value}, which sent nothing"
        got = produced.popleft()
        assert got == frame, (
            f"{link['name']}: frame {index} from the {role.value} differs:\n  recorded {frame.hex()}\n  sent     {got.hex()}"
        )
    pull()
    assert not produced, f"{link['name']}: the {role.value} sent more than was recorded: {produced[0].hex()}"
    assert conn.state is State.CLOSED, f"{link['name']}: the {role.value} ended in {conn.state.name}"
    return events


def received(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, MessageReceived)]


def main(argv: list[str]) -> int:
    for name in argv or [p.value for p in Profile]:
        profile = Profile(name)
        text = json.dumps(record(profile), indent=1)
        path(profile).write_text(text + "\n")
        print(f"wrote {path(profile)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
