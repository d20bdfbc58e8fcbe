"""Which cases run: a covering design in `make test`, the whole product on request.

The product (every position x every fault kind x both profiles x every suite) is thousands of cases,
each starting processes. `make test` runs a covering design instead: in each profile every one of
the seven faults meets every frame position of each direction of a one-way session once; the two
faults with two variants alternate them by position and profile, and the suite rotates with the
position, fault, profile and direction, so each fault meets each suite too. Positions past the end
of a key-1 session take session keys, whose sessions are longer. A two-way sample adds the frames
only a two-way session has (the server's messages, requests that cross). ``ISCL_ADVERSARIAL=full``
(or `make adversarial`) runs the whole product instead.
"""

from __future__ import annotations

import os

from iscl_hsm.engine import Profile

from .cli import DELAY, SUITES, CliCase, Suite
from .faults import FAULTS, Fault, Kind
from .gateway import GATEWAY_SUITES, GatewayCase

FULL = os.environ.get("ISCL_ADVERSARIAL", "") == "full"
"""Run the whole product instead of the covering design."""

FRAMES = {
    # (two-way, session keys): frames of each direction of a link without a fault
    (False, False): {"c2s": 12, "s2c": 8},
    (False, True): {"c2s": 14, "s2c": 10},
    (True, False): {"c2s": 14, "s2c": 14},
    (True, True): {"c2s": 18, "s2c": 18},
}
"""Frames of each direction of a session without a fault (test_the_sessions_have_the_frames_the_design_assumes
checks them). A two-way session's close may take one refusal more or less, as the two ends' inputs end."""

TWO_WAY_STRIDE = 8
"""In `make test`, a two-way session meets each fault at every TWO_WAY_STRIDE-th position."""


def fault(kind: Kind, direction: str, position: int) -> Fault:
    return Fault(kind, direction, position, DELAY if kind is Kind.DELAY else 0.0)


def suites_reaching(two_way: bool, direction: str, position: int) -> list[Suite]:
    """The suites whose session has a frame at ``position`` of ``direction``."""
    return [s for s in SUITES if FRAMES[(two_way, s.session_keys)][direction] > position]


def positions(two_way: bool, direction: str) -> range:
    return range(max(FRAMES[(two_way, keys)][direction] for keys in (False, True)))


def covering(two_way: bool, stride: int = 1) -> list[CliCase]:
    """Each fault at each ``stride``-th position of each direction, in both profiles, suites rotated."""
    cases = []
    for p, profile in enumerate(Profile):
        for f, variants in enumerate(FAULTS.values()):
            for d, direction in enumerate(("c2s", "s2c")):
                for k in positions(two_way, direction):
                    if (k + f + p) % stride:
                        continue
                    kind = variants[(k + p) % len(variants)]
                    reaching = suites_reaching(two_way, direction, k)
                    suite = reaching[(k + 3 * f + 5 * p + 7 * d) % len(reaching)]
                    cases.append(CliCase(profile, suite, fault(kind, direction, k), two_way))
    return cases


def product(two_way: bool) -> list[CliCase]:
    """Every fault kind at every position of each direction, in both profiles and the six suites
    (encryption x MAC); the key mode alternates with the position (session keys where only their
    longer sessions reach)."""
    cases = []
    for profile in Profile:
        for n, kind in enumerate(Kind):
            for direction in ("c2s", "s2c"):
                for k in positions(two_way, direction):
                    keys = FRAMES[(two_way, False)][direction] <= k or (k + n) % 2 == 1
                    cases += [
                        CliCase(profile, suite, fault(kind, direction, k), two_way)
                        for suite in SUITES
                        if suite.session_keys == keys
                    ]
    return cases


def untouched(two_way: bool) -> list[CliCase]:
    """Sessions without a fault: the baseline, and the frame counts. One-way: each profile and suite
    (every accept-many server starts with one); two-way: each suite, the profiles taking turns (all
    of them with ISCL_ADVERSARIAL=full)."""
    if two_way and not FULL:
        profiles = list(Profile)
        return [CliCase(profiles[n % 2], suite, None, True) for n, suite in enumerate(SUITES)]
    return [CliCase(profile, suite, None, two_way) for profile in Profile for suite in SUITES]


def cli_cases() -> list[CliCase]:
    if FULL:
        return untouched(False) + untouched(True) + product(False) + product(True)
    return untouched(False) + untouched(True) + covering(False) + covering(True, TWO_WAY_STRIDE)


# --- the gateway -----------------------------------------------------------------------------------

GATEWAY_FRAMES = {False: {"c2s": 18, "s2c": 17}, True: {"c2s": 24, "s2c": 23}}
"""Frames each direction of one association (one small C-STORE) has at least, by session keys: how
many more depends on how the client tunnel's reads meet storescu's writes (a P-DATA PDU's header
may travel as a message of its own), up to 3 key 1 and 5 with session keys. The untouched cases of
test_gateway_faults.py check the minimum."""
GATEWAY_STRIDE = 3
"""In `make test`, each fault meets every GATEWAY_STRIDE-th position of the association."""


def gateway_positions(direction: str) -> range:
    return range(max(frames[direction] for frames in GATEWAY_FRAMES.values()))


def gateway_suites_reaching(direction: str, position: int) -> list[Suite]:
    return [s for s in GATEWAY_SUITES if GATEWAY_FRAMES[s.session_keys][direction] > position]


def gateway_cases() -> list[GatewayCase]:
    """Untouched associations of each profile and suite, then the covering design (every
    GATEWAY_STRIDE-th position, offset by fault and profile, so that together the faults meet every
    position), or with ISCL_ADVERSARIAL=full every kind at every position in every suite."""
    cases = [GatewayCase(profile, suite, None) for profile in Profile for suite in GATEWAY_SUITES]
    for p, profile in enumerate(Profile):
        for f, variants in enumerate(FAULTS.values()):
            for d, direction in enumerate(("c2s", "s2c")):
                for k in gateway_positions(direction):
                    reaching = gateway_suites_reaching(direction, k)
                    if FULL:
                        cases += [
                            GatewayCase(profile, s, fault(kind, direction, k))
                            for kind in variants
                            for s in reaching
                        ]
                    elif (k + f + p) % GATEWAY_STRIDE == 0:
                        kind = variants[(k + p) % len(variants)]
                        suite = reaching[(k + 3 * f + 5 * p + 7 * d) % len(reaching)]
                        cases.append(GatewayCase(profile, suite, fault(kind, direction, k)))
    return cases
