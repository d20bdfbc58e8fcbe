"""`iscl echo`, `iscl store` and `iscl serve`: DICOM verification and storage over ISCL links.

Only their options are here; what they do is in dicom_run.py, imported when one of them runs, so that
every other command starts without loading pynetdicom and pydicom (half a second of CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import wire
from .extras import DICOM
from .options import add_link_options, add_timeout_options, deferred

SCU_TITLE, SCP_TITLE = "ISCL-SCU", "ISCL-SCP"


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    echo = _command(
        sub, "echo", "check a DICOM peer over ISCL with C-ECHO",
        "Open an ISCL link, request a DICOM association and send one C-ECHO. Prints the ISCL link's"
        " parameters and the round-trip time. Exit status 0 if the peer answered Success. Example:\n"
        "  iscl echo pacs.example.org 2761 --aec PACS",
    )  # fmt: skip
    _add_peer(echo)
    echo.set_defaults(run=deferred(__name__ + "_run", "run_echo", DICOM))

    store = _command(
        sub, "store", "send DICOM files and folders over ISCL with C-STORE",
        "Send every DICOM Part 10 file among PATHs (folders recursively), each in its own transfer"
        " syntax, over one ISCL link and association. Progress goes to stderr (a summary only when"
        " stderr is not a terminal). Files that are not DICOM, cannot be read, are truncated or damaged,"
        " or lack their SOP UIDs are reported and skipped. Exit status 0 only if every file found was"
        " stored. Example:\n"
        "  iscl store pacs.example.org 2761 --aec PACS study/",
    )  # fmt: skip
    _add_peer(store, port_required=True)
    store.add_argument("paths", metavar="PATH", nargs="+", type=Path, help="DICOM files or folders")
    store.set_defaults(run=deferred(__name__ + "_run", "run_store", DICOM))

    serve = _command(
        sub, "serve", "a storage SCP over ISCL that writes what it receives to a folder",
        "Accept ISCL links and DICOM associations (Verification and the storage SOP classes, any"
        " transfer syntax). Each object is written as DIR/SOPInstanceUID.dcm (a Part 10 file in the"
        " transfer syntax it arrived in) through a temporary file, fsynced and renamed before the"
        " SCP answers success; a write failure answers 0xA700, a data set that is not whole or cannot"
        " be read 0xC000, one without the SOP UIDs of its request 0xA900 (nothing is written)."
        " Runs until interrupted. Example:\n"
        "  iscl serve --output /srv/incoming --listen 0.0.0.0:2761",
    )  # fmt: skip
    serve.add_argument("--output", metavar="DIR", type=Path, required=True,
                       help="existing, writable folder for received objects")
    serve.add_argument("--listen", metavar="HOST:PORT", default=f"0.0.0.0:{wire.DEFAULT_PORT}",
                       help="address to listen on (default: %(default)s)")
    serve.add_argument("--aet", metavar="TITLE", default=SCP_TITLE, help="this SCP's AE title (default: %(default)s)")
    _add_timeout(serve)
    add_link_options(serve)
    add_timeout_options(serve)
    serve.set_defaults(run=deferred(__name__ + "_run", "run_serve", DICOM))


def _command(sub: argparse._SubParsersAction, name: str, summary: str, text: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=f"{text}\n\nThis command {DICOM.advice}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _add_peer(parser: argparse.ArgumentParser, port_required: bool = False) -> None:
    parser.add_argument("host")
    if port_required:
        parser.add_argument("port", type=int, help=f"the peer's ISCL port (usually {wire.DEFAULT_PORT})")
    else:
        parser.add_argument("port", type=int, nargs="?", default=wire.DEFAULT_PORT,
                            help="the peer's ISCL port (default: %(default)s)")
    parser.add_argument("--aet", metavar="TITLE", default=SCU_TITLE, help="our AE title (default: %(default)s)")
    parser.add_argument("--aec", metavar="TITLE", default="ANY-SCP",
                        help="the peer's AE title (default: %(default)s)")
    _add_timeout(parser)
    add_link_options(parser)
    add_timeout_options(parser)


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=30.0,
                        help="limit for connecting and for each DICOM answer; the ISCL link's own limits are"
                        " the timeouts below (default: %(default)s)")
