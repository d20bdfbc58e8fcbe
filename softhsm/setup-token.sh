#!/bin/sh
# Create a SoftHSM2 token holding one site's ISCL keys: iscl-auth-1..8 and iscl-enc-1..8.
#   softhsm/setup-token.sh [--data-dir DIR] [--label LABEL] [--pin-file FILE] [--key-file FILE] [--host-readable]
# Keys listed in --key-file (lines "auth|enc N HEX", e.g. the keys shared with a peer site) are
# imported; the others are generated inside the token. --host-readable lets the host read the
# encryption keys, which V1.00 links with key ids 1..8 use as their DES keys (else inside the token). Prints the export lines for SOFTHSM2_CONF and
# OPENSSL_CONF, then each key's label and check value (KCV), never a key value or a PIN.
# Running it again adds only what is missing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m iscl_hsm.keyholder.provision "$@"
