#!/usr/bin/env bash
# The module on Debian's own nginx, as CI runs it after the full suite
# (scripts/test.sh calls this): builds the Debian package for the installed
# nginx (scripts/package-deb.sh), runs the t/ files of the module's core
# (handshake, chat, cross-worker, Redis outage, reload, shutdown) against
# /usr/sbin/nginx with the .so from that package, then t/debian/: install.t
# installs the package with apt, chats through it and purges it;
# package_errors.t gives package-deb.sh bad input. Needs root: it installs
# packages.
#
#   scripts/test-debian.sh             all of that
#   scripts/test-debian.sh t/close.t   the package, then the named .t files
#                                      against Debian's nginx (not t/debian/)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WSCHAT_ROOT"

[ "$(id -u)" -eq 0 ] || { log "run as root: this installs packages (nginx, nginx-dev, then the module's package)"; exit 1; }

# Not portable to nginx 1.22, so left out by default:
#   t/handshake_http2.t  `http2 on` (nginx >= 1.25.1; 1.22 has `listen ... http2`)
tests=(t/handshake.t t/handshake_names.t t/handshake_origin.t t/handshake_preread.t
       t/handshake_redirect.t t/chat_*.t t/redis_outage.t t/reload_*.t t/shutdown.t)
[ "$#" -gt 0 ] && tests=("$@")

# Debian's nginx postinst starts a system nginx on port 80. Docker images
# forbid that with a policy-rc.d; elsewhere a temporary one does, so CI does
# not leave a server listening on all addresses.
policy=/usr/sbin/policy-rc.d added_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Added by scripts/test-debian.sh while it installs nginx.\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    added_policy=1
    trap 'rm -f "$policy"' EXIT
fi
ensure_packages "${WSCHAT_BUILD_PACKAGES[@]}" "${WSCHAT_RUN_PACKAGES[@]}" \
    "${WSCHAT_DEBIAN_PACKAGES[@]}" perl
if [ -n "$added_policy" ]; then
    rm -f "$policy"
    trap - EXIT
fi

# Every nginx run as root (the tests', nginx -t) creates its temporary
# directories in /var/lib/nginx and chowns them to its worker user; put
# them back as they were when this ends.
var_lib=$(stat -c '%n %U' /var/lib/nginx/* 2>/dev/null || true)
restore_var_lib() {
    local d owner
    for d in /var/lib/nginx/*; do
        [ -d "$d" ] || continue
        owner=$(awk -v d="$d" '$1 == d { print $2 }' <<< "$var_lib")
        if [ -n "$owner" ]; then chown "$owner" "$d"; else rmdir "$d" 2>/dev/null || true; fi
    done
}
trap restore_var_lib EXIT

deb=$(scripts/package-deb.sh)

# The tests load the very .so the package ships.
unpacked=$(target_dir)/deb/unpacked
rm -rf "$unpacked"
dpkg-deb -x "$deb" "$unpacked"
TEST_NGINX_BINARY=/usr/sbin/nginx \
TEST_NGINX_MODULE=$unpacked/usr/lib/nginx/modules/ngx_http_websocket_chat_module.so \
    prove -j2 "${tests[@]}"

[ "$#" -gt 0 ] || WSCHAT_DEB=$deb prove t/debian/
