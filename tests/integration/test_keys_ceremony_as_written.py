"""The two-site ceremony of docs/security-officer.md, section 3, run exactly as written, on fresh tokens.

The test reads every ``sh`` block of section 3 from the document and runs each command line as it
stands, in a shell on a pseudo-terminal: hospital A's commands in A's folder with A's SoftHSM2
configuration, hospital B's in B's. The test plays the people: it types the PINs, presses Enter,
copies the components custodians read off A's screen into B's prompts, confirms their KCVs, and
reads out each site's key KCV to the other (the one value the document leaves to the reader). Only
the addresses of the link test change, to this machine and a free port. Section 3.5 says to repeat
3.2 to 3.4 for the encryption key, so those blocks run twice, the second time with ``--purpose enc``.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscl_hsm.keyholder.provision import softhsm_environment

from .background import Background
from .terminal import at_terminal

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "security-officer.md"
SECTION = re.compile(r"^## 3\. .*?(?=^## 4\. )", re.DOTALL | re.MULTILINE)
SUBSECTION = re.compile(r"^### (3\.\d) ", re.MULTILINE)
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def guide_commands() -> dict[str, list[str]]:
    """Every command line of section 3's ``sh`` blocks, by subsection number ("3.1": [...])."""
    section = SECTION.search(GUIDE.read_text())
    assert section, f"{GUIDE} has no section 3 followed by a section 4"
    parts = SUBSECTION.split(section.group(0))[1:]
    commands: dict[str, list[str]] = {}
    for number, text in zip(parts[::2], parts[1::2]):
        for block in SH_BLOCK.findall(text):
            commands.setdefault(number, []).extend(block.replace("\\\n", " ").strip().splitlines())
    return commands


@dataclass
class Hospital:
    """One site: its folder (the officer's working directory and HOME) and its own SoftHSM2."""

    name: str  # "a" or "b"
    folder: Path
    env: dict[str, str]
    user_pin: str
    so_pin: str

    @property
    def token(self) -> str:
        return f"hospital-{self.name}"

    def at_terminal(self, command: str, dialogue: list[tuple[str, str]]) -> str:
        """Run ``command`` in a shell on a terminal here, answering ``dialogue``; what it showed."""
        status, shown = at_terminal(["bash", "-c", f"cd {self.folder} && {command}"], self.env, dialogue)
        assert status == 0, f"{command!r} exited {status}:\n{shown}"
        assert "Traceback" not in shown, shown
        return shown


def _hospital(name: str, root: Path, shims: Path) -> Hospital:
    folder = root / f"hospital-{name}"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ISCL_", "SOFTHSM2_"))}
    env.update(softhsm_environment(root / f"softhsm-{name}"), HOME=str(folder))
    env.update(PATH=f"{shims}{os.pathsep}{env['PATH']}", PYTHONPATH=str(REPO))
    folder.mkdir()
    return Hospital(name, folder, env, f"user-{secrets.token_hex(4)}", f"so-{secrets.token_hex(4)}")


@pytest.fixture
def hospitals(tmp_path: Path) -> tuple[Hospital, Hospital]:
    """Two sites with empty SoftHSM2 token folders and an `iscl` on the PATH that runs this tree."""
    shims = tmp_path / "bin"
    shims.mkdir()
    iscl = shims / "iscl"
    iscl.write_text(f'#!/bin/sh\nexec {sys.executable} -m iscl_hsm "$@"\n')
    iscl.chmod(0o755)
    return _hospital("a", tmp_path, shims), _hospital("b", tmp_path, shims)


def _site(command: str, sites: tuple[Hospital, Hospital]) -> Hospital:
    """The site whose token (--token, --label) or PIN file the command names."""
    named = {m[0] or m[1] for m in re.findall(r"--(?:token|label) hospital-(\w)\b|\b(\w)\.pin\b", command)}
    assert len(named) == 1, f"the guide's command {command!r} names neither site, or both"
    return next(site for site in sites if site.name in named)


def _init_token(site: Hospital, command: str) -> None:
    if command.lstrip("(").startswith("umask"):
        site.at_terminal(command, [(f"user PIN for {site.token}: ", site.user_pin)])
        pin_file = site.folder / f"{site.name}.pin"
        assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
        assert pin_file.read_text() == site.user_pin + "\n"
        return
    prompt = f"new SO PIN for token '{site.token}'"
    shown = site.at_terminal(command, [(f"{prompt}: ", site.so_pin), (f"{prompt} again: ", site.so_pin)])
    assert f"token '{site.token}' initialised" in shown


def _generate_components(site: Hospital, command: str) -> tuple[list[str], str]:
    """Run the command as custodians 1 and 2 of A would; the components they copied, and the key KCV."""
    shown = site.at_terminal(
        command,
        [
            ("Press Enter to show component 1.", ""),
            ("Custodian 1: copy the component", ""),
            ("Press Enter to show component 2.", ""),
            ("Custodian 2: copy the component", ""),
        ],
    )
    components = re.findall(r"component \d of 2:\s+((?:[0-9A-F]{4} ?){4})", shown)
    assert len(components) == 2, shown
    return [c.strip() for c in components], _key_kcv(shown)


def _import_components(site: Hospital, command: str, components: list[str]) -> str:
    """Run the command as custodians 1 and 2 of B would, typing their forms; the key KCV."""
    dialogue = []
    for number, component in enumerate(components, 1):
        if number > 1:
            dialogue.append((f"Press Enter when custodian {number} is ready.", ""))
        dialogue += [
            (f"component {number} (hidden): ", component),
            (f"component {number} again: ", component),
            ("match your component form? [y/N] ", "y"),
        ]
    shown = site.at_terminal(command, dialogue)
    for component in components:
        assert component not in shown and component.replace(" ", "") not in shown
    return _key_kcv(shown)


def _key_kcv(shown: str) -> str:
    found = re.findall(r"key KCV: ([0-9A-F]{6})$", shown, re.MULTILINE)
    assert len(found) == 1, shown
    stored = re.search(r"^stored iscl-\w+-1 version 1 on token '[^']+': .*KCV (\w{6})$", shown, re.MULTILINE)
    assert stored and stored.group(1) == found[0], shown
    return str(found[0])


def _link(sites: tuple[Hospital, Hospital], commands: list[str]) -> None:
    server_line, client_line = commands
    a, b = sites
    assert _site(server_line, sites) is a and _site(client_line, sites) is b
    assert "0.0.0.0:2761" in server_line and "hospital-a.example.org 2761" in client_line
    server = Background(["bash", "-c", f"cd {a.folder} && {server_line.replace('0.0.0.0:2761', '127.0.0.1:0')}"],
                        a.env)  # fmt: skip
    try:
        port = server.wait_for(r"listening on 127\.0\.0\.1:(\d+)$").group(1)
        client_line = client_line.replace("hospital-a.example.org 2761", f"127.0.0.1 {port}")
        b.at_terminal(client_line, [])
        assert server.finish() == 0, server.lines
    finally:
        server.kill()
    sent = re.search(r'^echo "([^"]+)"', client_line)
    assert sent and (a.folder / "received.txt").read_text() == sent.group(1) + "\n"


def test_the_two_site_ceremony_runs_as_written(hospitals: tuple[Hospital, Hospital]) -> None:
    commands = guide_commands()
    assert sorted(commands) == ["3.1", "3.2", "3.3", "3.4", "3.6", "3.7"], commands
    for command in commands["3.1"]:
        _init_token(_site(command, hospitals), command)

    for purpose in ("auth", "enc"):
        [generate] = [c.replace("--purpose auth", f"--purpose {purpose}") for c in commands["3.2"]]
        [enter] = [c.replace("--purpose auth", f"--purpose {purpose}") for c in commands["3.3"]]
        assert _site(generate, hospitals).name == "a" and _site(enter, hospitals).name == "b"
        components, a_kcv = _generate_components(hospitals[0], generate)
        b_kcv = _import_components(hospitals[1], enter, components)
        assert a_kcv == b_kcv
        for check in commands["3.4"]:
            site = _site(check, hospitals)
            told = b_kcv if site.name == "a" else a_kcv  # each officer types the KCV the other read out
            check = re.sub(r"--kcv \w+", f"--kcv {told}", check.replace("--purpose auth", f"--purpose {purpose}"))
            shown = site.at_terminal(check, [])
            assert f"match: token '{site.token}' holds iscl-{purpose}-1 version 1 with KCV {told}" in shown

    _link(hospitals, commands["3.6"])
    for verify in commands["3.7"]:
        shown = _site(verify, hospitals).at_terminal(verify, [])
        # 5 entries: init-token (before the token could anchor anything), then 2 ceremonies and 2
        # checks, each anchored in the token.
        assert "5 entries, chain intact" in shown and "4 entries anchored in it" in shown, shown
        assert "not anchored" not in shown, shown
