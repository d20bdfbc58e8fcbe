"""The files iscl-hsm ships beside its code: the SoftHSM2 templates and the documentation.

In a source tree they are folders next to the iscl_hsm package (softhsm/, docs/). A wheel installs them
as data files (pyproject.toml, ``[tool.setuptools.data-files]``) under the installation's data folder:
``sys.prefix`` in a virtual environment, ``/usr/local`` for Debian's python3, ``~/.local`` with
``pip install --user``.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SharedFolder:
    """One shipped folder: where it is in the source tree and once installed, and a file it must hold."""

    in_tree: str
    installed: str
    marker: str

    def candidates(self) -> list[Path]:
        """Where the folder may be, in the order looked at: the source tree, then each data folder."""
        schemes = (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user"))
        data_folders = dict.fromkeys(Path(sysconfig.get_path("data", scheme)) for scheme in schemes)
        return [SOURCE_TREE / self.in_tree, *(data / self.installed for data in data_folders)]

    def find(self) -> Path | None:
        """The folder on this installation, or None if it is nowhere (a broken install)."""
        return next((folder for folder in self.candidates() if (folder / self.marker).is_file()), None)


SOFTHSM = SharedFolder("softhsm", "share/iscl-hsm/softhsm", "softhsm2.conf.in")
DOCS = SharedFolder("docs", "share/doc/iscl-hsm", "gateway.md")


def doc_reference(name: str = "") -> str:
    """Where a user reads the document ``name`` ("gateway.md"; empty: the folder): its path on this
    installation, for help texts and error messages; if the docs are not installed, where they are in
    the source."""
    folder = DOCS.find()
    return str(folder / name) if folder is not None else f"docs/{name} in the iscl-hsm source"
