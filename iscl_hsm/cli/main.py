"""`iscl`: the command line. One module per command group; this one only dispatches and reports."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .. import __version__, logs
from ..allocator import keep_bulk_buffers
from ..errors import IsclError
from ..shared import doc_reference
from . import card, demo, dicom, docs, keys, link, tunnel
from .extras import MissingExtraError
from .status import EXIT_CONFIG, EXIT_FAILURE, exit_status

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "build_parser", "main", "reporting"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iscl",
        description="ISCL V1.00 (MEDIS-DC) secure links for DICOM, with keys in a PKCS#11 token.\n\n"
        "Start with `iscl demo`: it creates a SoftHSM2 token with demo keys and runs a secured\n"
        "exchange on this machine. Then try `iscl server` and `iscl client` in two terminals.\n\n"
        "The documentation: `iscl docs` lists it, `iscl docs NAME` prints one; here it is in\n"
        f"{doc_reference()}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"iscl-hsm {__version__} (MEDIS-ISCL V1.00)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (twice: debug)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    demo.add_commands(sub)
    link.add_commands(sub)
    keys.add_commands(sub)
    card.add_commands(sub)
    tunnel.add_commands(sub)
    dicom.add_commands(sub)
    docs.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logs.configure(level, getattr(args, "log_format", "text"))  # (the tunnels have --log-format)
    keep_bulk_buffers()
    return reporting(lambda: args.run(args), args.command)


def reporting(run: Callable[[], int], command: str) -> int:
    """``run()``'s exit status; an expected failure is one line on stderr and a status, no traceback."""
    try:
        return int(run())
    except MissingExtraError as exc:
        print(f"iscl {command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except IsclError as exc:
        print(f"iscl: {exc}", file=sys.stderr)
        return exit_status(command, exc)
    except OSError as exc:  # connection refused, address in use, connection reset, ...
        print(f"iscl: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
