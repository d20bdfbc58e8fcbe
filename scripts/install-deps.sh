#!/usr/bin/env bash
# Install what iscl-hsm needs for `make demo` and `make test` on Debian 12: the Debian packages
# (SoftHSM2, OpenSC, PC/SC, DCMTK, the build tools pyscard needs) and this package, editable, with
# its extras. Safe to run again: apt runs only for packages dpkg says are missing, pip only when
# the stamp is stale or a requirement is no longer met. Called by `make deps`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=card,dicom,test
STAMP=build/deps.stamp   # build/ is git-ignored
# openssl (the command) and stunnel4 are only for `make bench` (its baseline figures, the TLS tunnel pair);
# haproxy for the scale-out test; systemd (systemd-analyze) and procps (/bin/kill, the units'
# ExecReload) for the check of the shipped units (test_systemd_units.py); tmux for the check that no key
# component stays in a terminal's history (test_keys_secret_components.py).
APT_PACKAGES=(softhsm2 opensc pcscd vsmartcard-vpcd libpcsclite-dev swig dcmtk openssl stunnel4 haproxy systemd procps
    tmux)

# 1. Debian packages: apt-get update and install only when one is missing.
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "install-deps: apt-get install ${missing[*]}" >&2
    sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" </dev/null
fi

# 2. Python packages. The stamp is a hash of what decides the install (this script, pyproject.toml,
# the interpreter); even with a fresh stamp, check cheaply that this checkout is the editable install
# and that every requirement (with the extras) is present in a matching version.
want=$({ cat scripts/install-deps.sh pyproject.toml; "$PYTHON" -c 'import sys; print(sys.prefix, sys.version)'; } | sha256sum)
satisfied() {
    "$PYTHON" -P - "$EXTRAS" <<'PY'  # -P: not this folder's iscl_hsm.egg-info, the installed metadata
import importlib.metadata as md, json, sys, tomllib
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh machine: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
wanted = project["dependencies"] + [r for e in sys.argv[1].split(",") for r in project["optional-dependencies"][e]]
def editable_here(origin):
    path = Path(url2pathname(urlparse(origin.get("url", "")).path))
    return origin.get("dir_info", {}).get("editable") and path.resolve() == Path.cwd().resolve()
origins = [json.loads(d.read_text("direct_url.json") or "{}") for d in md.distributions(name=project["name"])]
if not any(editable_here(o) for o in origins):
    sys.exit(1)  # not installed, installed from another checkout, or not editable
try:
    for text in wanted:
        req = Requirement(text)
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            sys.exit(1)
except md.PackageNotFoundError:
    sys.exit(1)
PY
}
if [[ -f $STAMP && $(<"$STAMP") == "$want" ]] && satisfied; then
    exit 0
fi
echo "install-deps: pip install -e .[$EXTRAS]" >&2
"$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -e ".[$EXTRAS]"
if command -v pyenv >/dev/null; then pyenv rehash; fi   # puts the new `iscl` command on PATH
mkdir -p "$(dirname "$STAMP")"
printf '%s\n' "$want" >"$STAMP"
