#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian, as root), builds the
# module and its matching nginx, runs the unit tests and then t/ against real
# nginx and redis-server processes; then, as root, scripts/test-debian.sh
# (the module packaged for Debian's nginx, tested on it and installed).
#
#   scripts/test.sh            everything
#   scripts/test.sh t/close.t  only the named .t files (after the unit tests)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WSCHAT_ROOT"

# Perl: core modules plus IO::Socket::SSL (wss test); chromium drives the
# page test.
ensure_packages "${WSCHAT_BUILD_PACKAGES[@]}" "${WSCHAT_RUN_PACKAGES[@]}" \
    perl libio-socket-ssl-perl openssl chromium fonts-noto-color-emoji iproute2

cargo build --release --locked
cargo test --release --locked --workspace

# Each .t starts its own nginx and redis-server on free loopback ports; two at
# a time suits a 2-core machine.
if [ "$#" -gt 0 ]; then
    prove -j2 "$@"
else
    prove -j2 t/
    # The module packaged for, installed into and tested on Debian's own nginx.
    if [ "$(id -u)" -eq 0 ]; then
        scripts/test-debian.sh
    else
        log "skipping scripts/test-debian.sh: it installs packages, run it as root"
    fi
fi
