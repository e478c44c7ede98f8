#!/usr/bin/env bash
# Build the module and run a local chat demo: nginx (built by cargo, with the
# module loaded) on 127.0.0.1:8080 serving nginx/html/ and /ws, plus a private
# redis-server on a free loopback port.
#
#   scripts/demo.sh          build, (re)start, print the URL
#   scripts/demo.sh stop     stop nginx (graceful: pages see 1001) and the private redis
#
# Environment:
#   REDIS_URL    use this Redis (any websocket_chat_redis address form:
#                host:port, unix:/path, redis://[user:pass@]host[:port][/db])
#                instead of starting a private redis-server
#   DEMO_LISTEN  listen address (default 127.0.0.1:8080)
#   TEST_NGINX_BINARY / TEST_NGINX_MODULE  use these instead of cargo's outputs
#   DEMO_SKIP_BUILD=1  do not run cargo build
# Meant to run as root on Debian (it apt-get installs what is missing); as
# another user it uses sudo for that, or asks you to install them.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WSCHAT_ROOT"

RUN="$(target_dir)/demo"
LISTEN="${DEMO_LISTEN:-127.0.0.1:8080}"
LISTEN_HOST="${LISTEN%:*}"
LISTEN_PORT="${LISTEN##*:}"
SELF="$WSCHAT_ROOT/scripts/demo.sh"

stop_demo() {
    local any=0
    # QUIT: graceful shutdown. Chat sessions get close code 1001 ("going
    # away"), so open pages reconnect (and resume) once nginx is back;
    # TERM then KILL only if it has not gone within 10 s.
    if pid_alive "$RUN/nginx.pid"; then any=1; log "stopping nginx gracefully (pid $(cat "$RUN/nginx.pid"), QUIT)"; fi
    stop_pidfile "$RUN/nginx.pid" 10 QUIT
    if pid_alive "$RUN/redis.pid"; then any=1; log "stopping redis-server (pid $(cat "$RUN/redis.pid"))"; fi
    stop_pidfile "$RUN/redis.pid" 5
    return $((1 - any))
}

case "${1:-start}" in
    stop)
        if stop_demo; then echo "demo stopped"; else echo "demo was not running"; fi
        exit 0
        ;;
    start) ;;
    -h|--help|help)
        sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [start|stop]" >&2
        exit 2
        ;;
esac

# ---- packages and build --------------------------------------------------------
pkgs=("${WSCHAT_BUILD_PACKAGES[@]}")
[ -z "${REDIS_URL:-}" ] && pkgs+=("${WSCHAT_RUN_PACKAGES[@]}")
ensure_packages "${pkgs[@]}"

if [ "${DEMO_SKIP_BUILD:-0}" != 1 ]; then
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || { log "cargo not found: install a Rust toolchain (https://rustup.rs), then rerun"; exit 1; }
    log "cargo build --release"
    cargo build --release
fi

NGINX="$(nginx_bin)"
MODULE="$(chat_module)"
HTML="$WSCHAT_ROOT/nginx/html"

# ---- (re)start -----------------------------------------------------------------
stop_demo || true
mkdir -p "$RUN/logs"

if port_open "$LISTEN_HOST" "$LISTEN_PORT"; then
    log "something else already listens on $LISTEN; stop it or set DEMO_LISTEN=127.0.0.1:<port>"
    exit 1
fi

if [ -n "${REDIS_URL:-}" ]; then
    REDIS="$REDIS_URL"
    log "using Redis at $REDIS"
else
    command -v redis-server >/dev/null 2>&1 || { log "redis-server not found"; exit 1; }
    REDIS_PORT="$(free_port)"
    cat >"$RUN/redis.conf" <<EOF
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $RUN/redis.pid
logfile $RUN/logs/redis.log
dir $RUN
save ""
appendonly no
EOF
    redis-server "$RUN/redis.conf"
    wait_tcp 127.0.0.1 "$REDIS_PORT" 10 || { tail -n 20 "$RUN/logs/redis.log" >&2 || true; exit 1; }
    REDIS="127.0.0.1:$REDIS_PORT"
    log "redis-server on $REDIS (pid $(cat "$RUN/redis.pid" 2>/dev/null || echo '?'))"
fi

# Fill in the template. perl, not sed: the values are used verbatim whatever
# characters the paths or the Redis URL hold.
T_MODULE="$MODULE" T_PREFIX="$RUN" T_HTML="$HTML" T_REDIS="$REDIS" T_LISTEN="$LISTEN" \
    perl -pe 's/\@(MODULE|PREFIX|HTML|REDIS|LISTEN)\@/$ENV{"T_$1"}/g' \
    "$WSCHAT_ROOT/nginx/demo.conf.in" >"$RUN/nginx.conf"

# As root, nginx workers run as "nobody"; if that user cannot read the page
# (say the checkout lives under /root), run the workers as root instead.
if [ "$(id -u)" -eq 0 ] && command -v runuser >/dev/null 2>&1 &&
   ! runuser -u nobody -- test -r "$HTML/index.html" 2>/dev/null; then
    log "user nobody cannot read $HTML; nginx workers will run as root"
    sed -i '1i user root;' "$RUN/nginx.conf"
fi

ngx=("$NGINX" -p "$RUN/" -c "$RUN/nginx.conf" -e "$RUN/logs/error.log")
if ! out="$("${ngx[@]}" -t 2>&1)"; then
    printf '%s\n' "$out" >&2
    log "nginx -t failed for $RUN/nginx.conf"
    stop_pidfile "$RUN/redis.pid"
    exit 1
fi
"${ngx[@]}"

# Wait until the page answers.
ok=0
for ((i = 0; i < 100; i++)); do
    if ! pid_alive "$RUN/nginx.pid" && [ "$i" -gt 20 ]; then break; fi
    if port_open "$LISTEN_HOST" "$LISTEN_PORT"; then
        if ! command -v curl >/dev/null 2>&1 ||
           curl -fsS -o /dev/null --max-time 2 "http://$LISTEN/"; then
            ok=1
            break
        fi
    fi
    sleep 0.1
done
if [ "$ok" != 1 ]; then
    log "nginx did not answer on $LISTEN; last lines of $RUN/logs/error.log:"
    tail -n 20 "$RUN/logs/error.log" >&2 || true
    exit 1
fi

cat <<EOF

websocket_chat demo is running (nginx pid $(cat "$RUN/nginx.pid"), Redis $REDIS)

  open:  http://$LISTEN/?room=lobby
         (open it in two tabs, pick two nicknames, and chat)
  stop:  $SELF stop

  config: $RUN/nginx.conf
  logs:   $RUN/logs/error.log  $RUN/logs/access.log
EOF
