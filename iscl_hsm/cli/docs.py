"""`iscl docs`: where the documentation is on this installation, and each document's text.

Help texts point at a document as `iscl docs NAME` (a path would be cut at its hyphens when argparse
wraps the text), error messages by its path here (:func:`iscl_hsm.shared.doc_reference`). This command
lists the documents with their titles and prints one, for a wheel's user who has no source tree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ErrorCode, IsclError
from ..shared import DOCS


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "docs",
        help="list the documentation, or print one document",
        description="Without NAME, list the documents (Markdown files) installed with iscl-hsm, with their"
        " titles and folder. With NAME (e.g. 'gateway'), print that document. --path prints the path of the"
        " document, or of the folder."
        " Examples:\n  iscl docs\n  iscl docs gateway | less\n  iscl docs --path security-officer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", nargs="?", help="a document's name, with or without .md")
    parser.add_argument("--path", action="store_true", help="print the path instead of the text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = docs_folder()
    if args.name is None:
        if args.path:
            print(folder)
        else:
            print(listing(folder))
        return 0
    document = find_document(folder, args.name)
    if args.path:
        print(document)
    else:
        sys.stdout.write(document.read_text(encoding="utf-8"))
    return 0


def docs_folder() -> Path:
    folder = DOCS.find()
    if folder is None:
        looked = ", ".join(str(c) for c in DOCS.candidates())
        raise IsclError(ErrorCode.BAD_OPTION, f"the documentation is not installed here (looked in {looked})")
    return folder


def documents(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.md"))


def find_document(folder: Path, name: str) -> Path:
    """The document ``name`` ("gateway" or "gateway.md") in ``folder``; a one-line error naming the others."""
    stem = name.removesuffix(".md")
    for document in documents(folder):
        if document.stem == stem:
            return document
    names = ", ".join(document.stem for document in documents(folder))
    raise IsclError(ErrorCode.BAD_OPTION, f"no document {name!r}; the documents are: {names}")


def listing(folder: Path) -> str:
    """One line per document, its name and title (its first heading), under the folder's path."""
    rows = [(document.stem, title(document)) for document in documents(folder)]
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"{folder}:", *(f"  {name:<{width}}  {heading}" for name, heading in rows)])


def title(document: Path) -> str:
    with document.open(encoding="utf-8") as text:
        first = text.readline()
    return first.lstrip("#").strip()
