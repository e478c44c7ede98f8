# Shared shell helpers for scripts/demo.sh and the CI script. Source it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Functions: ensure_packages, nginx_bin, chat_module, free_port, wait_tcp, log
# Needs bash; safe under `set -euo pipefail`.

# Repository root (the directory holding Cargo.toml), whatever the caller's cwd.
WSCHAT_ROOT="${WSCHAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

# System packages the build and the demo need (Debian names).
WSCHAT_BUILD_PACKAGES=(build-essential pkg-config libclang-dev libpcre2-dev libssl-dev zlib1g-dev)
WSCHAT_RUN_PACKAGES=(redis-server)
# Debian's nginx and what its modules are packaged with (nginx-dev brings
# debhelper): scripts/package-deb.sh needs them, scripts/test-debian.sh
# installs them.
WSCHAT_DEBIAN_PACKAGES=(nginx nginx-dev dpkg-dev)

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# The cargo target directory (honours CARGO_TARGET_DIR).
target_dir() {
    local t="${CARGO_TARGET_DIR:-$WSCHAT_ROOT/target}"
    case "$t" in /*) ;; *) t="$WSCHAT_ROOT/$t" ;; esac
    printf '%s\n' "$t"
}

# ensure_packages pkg...: apt-get install those of the given Debian packages
# that `dpkg -s` does not report as installed. Nothing happens when all are
# there; apt-get update runs only when something must be installed.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$p")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            log "missing packages: ${missing[*]} (run as root, or install them yourself)"
            return 1
        fi
    fi
    log "installing: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# nginx_bin: print the path of the nginx binary that cargo built alongside the
# module: target/release/nginx, which build.rs links to it. TEST_NGINX_BINARY
# overrides. Fails when there is none.
nginx_bin() {
    local bin="${TEST_NGINX_BINARY:-$(target_dir)/release/nginx}"
    [ -x "$bin" ] || { log "no nginx binary at $bin (run cargo build --release; build.rs links it)"; return 1; }
    printf '%s\n' "$bin"
}

# chat_module: print the path of the built module (.so). TEST_NGINX_MODULE overrides.
chat_module() {
    local m="${TEST_NGINX_MODULE:-$(target_dir)/release/libngx_http_websocket_chat_module.so}"
    [ -f "$m" ] || { log "module not found: $m (run cargo build --release)"; return 1; }
    printf '%s\n' "$m"
}

# free_port: print a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
    perl -MIO::Socket::INET -e '
        my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1",
                                      LocalPort => 0, Proto => "tcp", ReuseAddr => 1)
            or die "free_port: $!\n";
        print $s->sockport, "\n";'
}

# port_open host port: true when something accepts TCP connections there.
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_tcp host port [seconds=10]: wait until host:port accepts connections.
wait_tcp() {
    local host=$1 port=$2 secs=${3:-10} i
    for ((i = 0; i < secs * 10; i++)); do
        port_open "$host" "$port" && return 0
        sleep 0.1
    done
    log "nothing answered on $host:$port within ${secs}s"
    return 1
}

# pid_alive pidfile: true when the pid in pidfile names a running process.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# gone_within pid seconds: wait up to that long for pid to exit; true if it did.
gone_within() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$pid" 2>/dev/null
}

# stop_pidfile pidfile [seconds=5] [signal=TERM]: send signal (TERM, or QUIT
# for nginx's graceful shutdown) to the process in pidfile and wait for it to
# go; after the grace period send TERM (if the signal was another one) and
# wait 3 more seconds, then KILL it and its direct children (nginx workers).
# Removes the file.
stop_pidfile() {
    local f=$1 secs=${2:-5} sig=${3:-TERM} pid kids
    if pid_alive "$f"; then
        pid=$(cat "$f")
        kill -"$sig" "$pid" 2>/dev/null || true
        if ! gone_within "$pid" "$secs" && [ "$sig" != TERM ]; then
            log "pid $pid still running ${secs}s after $sig; sending TERM"
            kill -TERM "$pid" 2>/dev/null || true
            gone_within "$pid" 3 || true
        fi
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid still running; sending KILL"
            kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
            # shellcheck disable=SC2086 # one pid per word
            kill -KILL "$pid" $kids 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}
