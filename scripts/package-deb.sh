#!/usr/bin/env bash
# Build the Debian package of the module for the nginx installed on this
# machine, and print its path on stdout:
#
#   scripts/package-deb.sh [configured nginx tree]     # or: make deb
#   -> target/deb/libnginx-mod-http-websocket-chat_<version>_<arch>.deb
#
# The package is made like Debian's own libnginx-mod-* packages (debian/rules,
# dpkg-buildpackage, dh's nginx sequence), so it needs Debian's nginx and
# nginx-dev installed; it depends on the nginx-abi-* of that nginx, and apt
# refuses it on any other.
#
# Without an argument the module is built against a copy of nginx-dev's tree
# (/usr/share/nginx/src) configured with the installed nginx's flags, kept in
# target/deb/ while nginx-dev's version stays the same. A tree given instead
# must be configured and be the installed nginx's version.
#
# Environment:
#   NGINX_BINARY       the nginx the package is for (default: /usr/sbin/nginx;
#                      not NGINX, which nginx itself reads)
#   CARGO              cargo binary (default: cargo in PATH)
#   DEB_BUILD_OPTIONS  nocheck skips loading the module into that nginx at the end
#                      of the build
# Then `lintian target/deb/*.changes` checks the result (not run here: slow).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WSCHAT_ROOT"

die() { log "$*"; exit 1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

pkg=libnginx-mod-http-websocket-chat
nginx=${NGINX_BINARY:-/usr/sbin/nginx}
devsrc=/usr/share/nginx/src
out=$(target_dir)/deb

[ $# -le 1 ] || die "usage: ${0##*/} [configured nginx tree]"

command -v dpkg-buildpackage >/dev/null ||
    die "dpkg-buildpackage not found: this builds a Debian package, on Debian (apt-get install dpkg-dev)"
installed nginx && [ -x "$nginx" ] ||
    die "Debian's nginx is not installed (no $nginx): apt-get install nginx nginx-dev"
installed nginx-dev && [ -f "$devsrc/conf_flags" ] ||
    die "nginx-dev is not installed: apt-get install nginx-dev (it has the installed nginx's source tree, its configure flags and its ABI name)"
cargo=${CARGO:-$(command -v cargo || true)}
[ -n "$cargo" ] && "$cargo" --version >/dev/null 2>&1 ||
    die "cargo not found: install Rust >= 1.88 (https://rustup.rs; bookworm's rustc is too old) or set CARGO"

# dh_nginx takes the ABI from nginx-dev; make sure the installed nginx
# provides that very ABI before building something apt would refuse.
abi=$(sed -n 's/^nginx:abi=//p' "$devsrc/debian/libnginx-mod.abisubstvars")
provides=$(dpkg-query -W -f='${Provides}' nginx)
[ -n "$abi" ] || die "no nginx:abi in $devsrc/debian/libnginx-mod.abisubstvars: reinstall nginx-dev"
case ", $provides," in
    *", $abi,"* | *", $abi "*) ;;
    *) die "nginx-dev is for $abi, which the installed nginx does not provide ($provides): install the nginx and nginx-dev of one version (apt-get install nginx nginx-dev)" ;;
esac

# The module loads only into the nginx version it was built against.
nginx_version=$("$nginx" -v 2>&1 | sed -n 's|^nginx version: nginx/\([0-9.]*\).*|\1|p')
[ -n "$nginx_version" ] || die "cannot read the version of $nginx (nginx -v)"
tree_version() { sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$1/src/core/nginx.h" 2>/dev/null; }

if [ $# -eq 1 ]; then
    tree=$1
    [ -d "$tree" ] || die "not a directory: $tree"
    tree=$(cd "$tree" && pwd)
    [ -f "$tree/ngx_auto_config.h" ] && tree=$(dirname "$tree")    # an objs dir
    [ -f "$tree/src/core/nginx.h" ] || die "$tree is not an nginx source tree (no src/core/nginx.h)"
    [ -f "$tree/objs/ngx_auto_config.h" ] && [ -f "$tree/objs/Makefile" ] ||
        die "$tree is not configured: run \`. ./conf_flags && ./configure \"\${NGX_CONF_FLAGS[@]}\"\` in it (a copy of $devsrc), or run ${0##*/} without an argument to let it do that"
    v=$(tree_version "$tree")
    [ "$v" = "$nginx_version" ] ||
        die "$tree is nginx ${v:-?} but $nginx is $nginx_version: build against the tree of the nginx the module will load into (run ${0##*/} without an argument to use nginx-dev's)"
else
    dev_version=$(dpkg-query -W -f='${Version}' nginx-dev)
    tree=$out/nginx-src-$dev_version
    stamp="nginx-dev $dev_version $(md5sum < "$devsrc/conf_flags")"
    if [ "$(cat "$tree/.wschat-configured" 2>/dev/null)" != "$stamp" ]; then
        log "configuring a copy of $devsrc in $tree"
        rm -rf "$out"/nginx-src-*    # older nginx-dev versions' too
        mkdir -p "$out"
        cp -a "$devsrc" "$tree"
        # shellcheck disable=SC1091 # conf_flags is nginx-dev's, defines NGX_CONF_FLAGS
        (cd "$tree" && . ./conf_flags && ./configure "${NGX_CONF_FLAGS[@]}") > "$tree.configure.log" 2>&1 ||
            die "configure failed in $tree: see $tree.configure.log"
        printf '%s\n' "$stamp" > "$tree/.wschat-configured"
    fi
    v=$(tree_version "$tree")
    [ "$v" = "$nginx_version" ] ||
        die "nginx-dev's tree is nginx $v but $nginx is $nginx_version: install the nginx that nginx-dev is for (apt-get install nginx nginx-dev)"
fi

# The package version follows the crate's.
crate_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
version=$(dpkg-parsechangelog -l debian/changelog -S Version)
[ "$version" = "$crate_version" ] ||
    die "debian/changelog is at $version but Cargo.toml at $crate_version: add a debian/changelog entry for $crate_version"

# dpkg-buildpackage writes its results next to the source directory, so the
# build runs in a scratch copy of debian/ under target/deb/, not in the
# repository; debian/rules reads everything else from WSCHAT_ROOT.
build=$out/build
src=$build/$pkg-$version
rm -rf "$build"
mkdir -p "$src"
cp -a debian "$src/"
log "building $pkg $version for nginx $nginx_version ($abi) against $tree"
# debhelper points HOME elsewhere during the build; rustup and cargo must
# still find their homes.
(cd "$src" &&
    WSCHAT_ROOT=$WSCHAT_ROOT WSCHAT_NGINX_TREE=$tree NGINX_BINARY=$nginx CARGO=$cargo \
    CARGO_HOME=${CARGO_HOME:-$HOME/.cargo} RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup} \
    dpkg-buildpackage --build=binary --no-sign) >&2

arch=$(dpkg-architecture -q DEB_HOST_ARCH)
rm -f "$out/${pkg}_"* "$out/${pkg}-dbgsym_"*
mv "$build"/*.deb "$build"/*.changes "$build"/*.buildinfo "$out/"
rm -rf "$build"
deb=$out/${pkg}_${version}_$arch.deb
[ -f "$deb" ] || die "dpkg-buildpackage finished but $deb is missing"
printf '%s\n' "$deb"
