#!/usr/bin/env bash
# Build the module (.so) for an nginx that was configured elsewhere, e.g. a
# distribution's nginx, and print the path of the built .so on stdout.
#
#   scripts/build-against.sh <nginx source tree | its objs dir> [cargo args...]
#
# The tree must already have been configured (`./configure ...` has written
# objs/ngx_auto_config.h and objs/Makefile) with the same flags as the nginx
# binary that will load the module; see docs/building.md. Extra arguments go
# to cargo (e.g. --locked, -j1).
#
# Environment:
#   NGINX_SOURCE_DIR  source root, when an objs dir outside it is given
#                     (default: the tree given, or the objs dir's parent)
#   CARGO_TARGET_DIR  cargo target dir (default: target/against-nginx-<version>,
#                     kept apart from target/release, whose .so matches the
#                     vendored nginx)
#   CARGO             cargo binary (default: cargo)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
me=${0##*/}
die() { printf '%s: %s\n' "$me" "$*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: $me <configured nginx tree or objs dir> [cargo args...]"
arg=$1; shift
[ -d "$arg" ] || die "not a directory: $arg"
arg=$(cd "$arg" && pwd)

if [ -f "$arg/ngx_auto_config.h" ]; then
    objs=$arg
    src=${NGINX_SOURCE_DIR:-$(dirname "$arg")}
elif [ -f "$arg/src/core/nginx.h" ]; then
    src=$arg
    objs=$arg/objs
    if [ ! -f "$objs/ngx_auto_config.h" ]; then
        hint="run ./configure (or auto/configure) there first, with the flags of the nginx that will load the module"
        [ -f "$src/conf_flags" ] && hint='it looks like Debian'"'"'s nginx-dev tree: copy it, then run `. ./conf_flags && ./configure "${NGX_CONF_FLAGS[@]}"` in the copy'
        die "$arg is not configured (no objs/ngx_auto_config.h): $hint"
    fi
else
    die "$arg is neither an nginx source tree (src/core/nginx.h) nor a configured objs dir (ngx_auto_config.h)"
fi
src=$(cd "$src" && pwd)
[ -f "$src/src/core/nginx.h" ] || die "no nginx source at $src (set NGINX_SOURCE_DIR)"
[ -f "$objs/Makefile" ] || die "no $objs/Makefile: configure did not finish"

version=$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$src/src/core/nginx.h")
[ -n "$version" ] || die "cannot read NGINX_VERSION from $src/src/core/nginx.h"

if ! grep -q '^#define NGX_COMPAT' "$objs/ngx_auto_config.h"; then
    printf '%s: warning: %s was configured without --with-compat: the module will only load into an nginx built with exactly the same configure flags\n' "$me" "$objs" >&2
fi

target=${CARGO_TARGET_DIR:-$root/target/against-nginx-$version}
case "$target" in /*) ;; *) target=$PWD/$target ;; esac

printf '%s: building against nginx %s (source %s, objs %s) into %s\n' \
    "$me" "$version" "$src" "$objs" "$target" >&2

# Cargo's own output goes to stderr; stdout carries only the result path.
NGINX_SOURCE_DIR=$src NGINX_BUILD_DIR=$objs \
    "${CARGO:-cargo}" build --release --lib \
        --manifest-path "$root/Cargo.toml" \
        --no-default-features --features export-modules \
        --target-dir "$target" "$@" >&2

so=$target/release/libngx_http_websocket_chat_module.so
[ -f "$so" ] || die "cargo finished but $so is missing"
printf '%s\n' "$so"
