#!/usr/bin/env bash
# What the test suite needs from the system, installed with apt-get when missing (Debian/Ubuntu),
# run by `make test` (and so by .ci/run) before pytest. The tests start their own servers in
# temporary directories; they never use a system service the packages may set up, and they fail,
# not skip, when a binary is missing.
#   - postgresql: the usage-ledger tests (binaries in /usr/lib/postgresql/<version>/bin, off PATH)
#   - redis-server: the shared-state and cache tests
#   - chromium (+ a font, so that pages render text): the console's browser tests
set -euo pipefail

missing=()
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && ! command -v postgres >/dev/null 2>&1; then
    missing+=(postgresql)
fi
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "The tests need: ${missing[*]} (Debian package names); install them, then run make test again." >&2
    exit 1
fi
sudo_if_needed=""
if [ "$(id -u)" -ne 0 ]; then sudo_if_needed="sudo"; fi
echo "Installing ${missing[*]} with apt-get (what the tests need)" >&2
$sudo_if_needed apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
