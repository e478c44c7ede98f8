#!/usr/bin/env bash
# Side-by-side benchmark: this repository's websocket_chat module vs nchan
# (Debian's nginx + libnginx-mod-nchan) vs the classic OpenResty chat recipe
# (Debian's nginx + libnginx-mod-http-lua + lua-resty-websocket/-redis,
# bench/openresty/chat.lua), all bridged to the same private Redis, same
# scenarios, same load generator (bench/, wschat-bench).
#
#   bash bench/compare.sh            # full run, ~15-25 minutes
#   bash bench/compare.sh --quick    # ~6-10 minutes, shorter windows, fewer steps
#
# Options:
#   --quick            shorter runs
#   --only module|nchan|openresty  run one target (the table then has one column)
#   --build            run `cargo build --release` (module + nginx + bench) first;
#                      without it, only the bench crate is built, and the module is
#                      built only when its artefacts are missing
#   --out DIR          where results go (default bench/results)
#   --nchan-mode M     nchan_redis_storage_mode: distributed (default) or nostore
#   --presence on|off  the module's websocket_chat_presence (default off: nchan
#                      sends no join/leave events, so both do the same work)
#   --flush-delay T    the module's websocket_chat_flush_delay (default: the
#                      module's own, 20ms)
#
# Needs root for apt-get when nginx, libnginx-mod-nchan, libnginx-mod-http-lua,
# lua-nginx-websocket, lua-nginx-redis or redis-server are missing.
# Everything listens on 127.0.0.1 only; every run is bounded in time.
# Results: bench/results/compare-<date>.md (the table) and .json (raw reports).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ORIG_ARGS="$*"
QUICK=0
BUILD=0
ONLY=""
OUT="$ROOT/bench/results"
NCHAN_MODE=distributed
PRESENCE=off
PRESENCE_DEFAULT=off
FLUSH_DELAY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --build) BUILD=1 ;;
        --only) ONLY=$2; shift ;;
        --out) OUT=$2; shift ;;
        --nchan-mode) NCHAN_MODE=$2; shift ;;
        --presence) PRESENCE=$2; PRESENCE_DEFAULT=$2; shift ;;
        --flush-delay) FLUSH_DELAY=$2; shift ;;
        -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case "$NCHAN_MODE" in distributed|nostore) ;; *) echo "compare.sh: --nchan-mode distributed|nostore" >&2; exit 2 ;; esac
TARGETS=(module nchan openresty)
if [ -n "$ONLY" ]; then
    case "$ONLY" in module|nchan|openresty) ;; *) echo "compare.sh: --only module|nchan|openresty" >&2; exit 2 ;; esac
    TARGETS=("$ONLY")
fi

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- packages
ensure_packages() {
    local missing=() p
    # lua-nginx-websocket and lua-nginx-redis depend on nginx-extras, which
    # pulls in Debian's other dynamic modules too (none of them is loaded).
    for p in nginx libnginx-mod-nchan libnginx-mod-http-lua lua-nginx-websocket lua-nginx-redis \
        redis-server redis-tools; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || { log "missing packages: ${missing[*]} (run as root)"; exit 1; }
        log "installing: ${missing[*]}"
        # Keep Debian's maintainer scripts from starting nginx (port 80) and
        # redis (6379) as services while installing.
        local guard=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            guard=1
        fi
        env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || {
            [ "$guard" = 1 ] && rm -f /usr/sbin/policy-rc.d
            exit 1
        }
        [ "$guard" = 1 ] && rm -f /usr/sbin/policy-rc.d
    fi
    # Debian's nginx service, if anything started it: stop it and keep it off.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
    if [ -s /run/nginx.pid ]; then
        local pid
        pid=$(cat /run/nginx.pid)
        if kill -0 "$pid" 2>/dev/null && grep -q nginx "/proc/$pid/cmdline" 2>/dev/null; then
            log "stopping Debian's nginx service (pid $pid)"
            kill -QUIT "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    command -v update-rc.d >/dev/null 2>&1 && update-rc.d nginx disable >/dev/null 2>&1 || true
    [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || { log "nchan module not found"; exit 1; }
    local f
    for f in /usr/lib/nginx/modules/ndk_http_module.so /usr/lib/nginx/modules/ngx_http_lua_module.so \
        /usr/share/lua/5.1/nginx/websocket/server.lua /usr/share/lua/5.1/nginx/redis.lua; do
        [ -f "$f" ] || { log "$f not found (OpenResty recipe)"; exit 1; }
    done
}

# ---------------------------------------------------------------- helpers
# A free TCP port on 127.0.0.1 below the ephemeral range (so the clients'
# own source ports never take it between choosing and binding).
free_port() {
    python3 - <<'EOF'
import random, socket
for _ in range(200):
    p = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); s.close(); print(p); break
    except OSError:
        s.close()
else:
    raise SystemExit("no free port")
EOF
}

. "$ROOT/bench/lib.sh"

# ---------------------------------------------------------------- setup
ensure_packages
command -v python3 >/dev/null || { log "python3 is needed for the table"; exit 1; }

cd "$ROOT"
TD=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ] || [ ! -f "$TD/release/libngx_http_websocket_chat_module.so" ] || [ ! -x "$TD/release/nginx" ]; then
    log "cargo build --release"
    cargo build --release >&2
fi
log "cargo build --release -p wschat-bench"
cargo build --release -p wschat-bench >&2
BENCH_SRC="$TD/release/wschat-bench"

WORK=$(mktemp -d /tmp/wschat-compare.XXXXXX)
REDIS_PID=""
MASTER_PID=""
cleanup() {
    [ -n "$MASTER_PID" ] && stop_pid "$MASTER_PID" 10 QUIT
    [ -n "$REDIS_PID" ] && stop_pid "$REDIS_PID" 10 TERM
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Snapshot the binaries: another build may replace them while this runs.
cp -L "$TD/release/nginx" "$WORK/nginx-module"
cp "$TD/release/libngx_http_websocket_chat_module.so" "$WORK/module.so"
cp "$BENCH_SRC" "$WORK/wschat-bench"
# The recipe's Lua is read by the workers, which run as nobody: a readable
# directory for it inside the private (0700) temp dir.
chmod 711 "$WORK"
mkdir -m 755 "$WORK/lua"
install -m 644 "$ROOT/bench/openresty/chat.lua" "$WORK/lua/chat.lua"
BENCH="$WORK/wschat-bench"
NCHAN_NGINX=/usr/sbin/nginx # Debian's, for nchan and the OpenResty recipe
MODULE_SHA=$(sha256sum "$WORK/module.so" | cut -c1-16)
pkgver() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null || echo '?'; }
OPENRESTY_DESC="Debian's nginx + libnginx-mod-http-lua $(pkgver libnginx-mod-http-lua), lua-nginx-websocket $(pkgver lua-nginx-websocket), lua-nginx-redis $(pkgver lua-nginx-redis); bench/openresty/chat.lua sha256 $(sha256sum "$WORK/lua/chat.lua" | cut -c1-16)…"
export OPENRESTY_DESC

# Loopback source addresses for the clients (127.0.0.0/8 is all local on Linux).
SRC_A=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4
SRC_B=127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8
SRC_ALL=$SRC_A,$SRC_B
SRC_STORM=$(seq -s, -f '127.0.0.%g' 1 16)

REDIS_PORT=$(free_port)
# The OpenResty recipe holds one Redis connection per client (its subscriber)
# plus one per message being published: 10,000+ in (c) and (d). Redis needs
# maxclients + 32 files, and a process may hold at most 20,000 here.
REDIS_MAXCLIENTS=19900
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log" \
    --dir "$WORK" --maxclients "$REDIS_MAXCLIENTS" >/dev/null
wait_tcp 127.0.0.1 "$REDIS_PORT" 10 || { log "redis did not start"; cat "$WORK/redis.log" >&2; exit 1; }
REDIS_PID=$(cat "$WORK/redis.pid")
log "redis on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"

redis_clients() { # connections to Redis, not counting the redis-cli asking
    redis-cli -p "$REDIS_PORT" CLIENT LIST | grep -vc 'cmd=client' || true
}

# ---------------------------------------------------------------- nginx
write_conf() { # target dir port
    local t=$1 d=$2 port=$3
    mkdir -p "$d/logs" "$d/conf"
    {
        case "$t" in
            module) echo "load_module $WORK/module.so;" ;;
            nchan) echo "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;" ;;
            openresty)
                echo "load_module /usr/lib/nginx/modules/ndk_http_module.so;"
                echo "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;" ;;
        esac
        # The recipe's workers hold a Redis connection per client beside the
        # client's own: every file a process may have.
        cat <<EOF
worker_processes 2;
# Up to 18,000 connections per worker (scenario i) within the 20,000-file
# limit of a process.
worker_rlimit_nofile 20000;
pid $d/logs/nginx.pid;
error_log $d/logs/error.log warn;
events {
    worker_connections 19900;
}
http {
    access_log off;
    client_body_temp_path $d/tmp_body;
    proxy_temp_path $d/tmp_proxy;
    fastcgi_temp_path $d/tmp_fastcgi;
    uwsgi_temp_path $d/tmp_uwsgi;
    scgi_temp_path $d/tmp_scgi;
EOF
        if [ "$t" = module ]; then
            cat <<EOF
    websocket_chat_redis 127.0.0.1:$REDIS_PORT;
    server {
        # reuseport: the kernel spreads connections evenly over the two
        # workers, so that (i) fits each worker's files.
        listen 127.0.0.1:$port backlog=4096 reuseport;
        location = /ws {
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_user \$arg_nick;
            # nchan has no join/leave events: compare pub/sub alike.
            websocket_chat_presence $PRESENCE;
            websocket_chat_access_log $ACCESS_LOG;
            ${FLUSH_DELAY:+websocket_chat_flush_delay $FLUSH_DELAY;}
        }
    }
}
EOF
        elif [ "$t" = openresty ]; then
            cat <<EOF
    # Debian's Lua libraries (resty.core, nginx.websocket.*, nginx.redis).
    lua_package_path "/usr/share/lua/5.1/?.lua;;";
    server {
        # reuseport: the kernel spreads connections evenly over the two
        # workers, so that (i) fits each worker's files.
        listen 127.0.0.1:$port backlog=4096 reuseport;
        # The bench appends /<room> (nchan style); the recipe has one global
        # channel and ignores it.
        location /chat/ {
            set \$chat_redis_host 127.0.0.1;
            set \$chat_redis_port $REDIS_PORT;
            content_by_lua_file $WORK/lua/chat.lua;
        }
    }
}
EOF
        else
            cat <<EOF
    upstream wsbench_redis {
        nchan_redis_server redis://127.0.0.1:$REDIS_PORT;
        nchan_redis_storage_mode $NCHAN_MODE;
    }
    server {
        # reuseport: the kernel spreads connections evenly over the two
        # workers, so that (i) fits each worker's files.
        listen 127.0.0.1:$port backlog=4096 reuseport;
        # One channel per room; a websocket client on a pubsub location is a
        # subscriber, and the text frames it sends are published to the channel.
        location ~ ^/sub/([A-Za-z0-9_-]+)\$ {
            nchan_pubsub websocket;
            nchan_channel_id \$1;
            nchan_redis_pass wsbench_redis;
        }
    }
}
EOF
        fi
    } > "$d/conf/nginx.conf"
}

NGINX_DIR=""
PORT=""
URL=""
start_target() { # target
    local t=$1 bin
    NGINX_DIR="$WORK/$t-$RANDOM"
    PORT=$(free_port)
    write_conf "$t" "$NGINX_DIR" "$PORT"
    case "$t" in
        module) bin="$WORK/nginx-module"; URL="ws://127.0.0.1:$PORT/ws" ;;
        nchan) bin="$NCHAN_NGINX"; URL="ws://127.0.0.1:$PORT/sub" ;;
        openresty) bin="$NCHAN_NGINX"; URL="ws://127.0.0.1:$PORT/chat" ;;
    esac
    "$bin" -p "$NGINX_DIR" -c "$NGINX_DIR/conf/nginx.conf" -e "$NGINX_DIR/logs/error.log" -t -q \
        || { log "$t: nginx -t failed"; exit 1; }
    "$bin" -p "$NGINX_DIR" -c "$NGINX_DIR/conf/nginx.conf" -e "$NGINX_DIR/logs/error.log"
    wait_tcp 127.0.0.1 "$PORT" 10 || { log "$t: nginx did not start"; cat "$NGINX_DIR/logs/error.log" >&2; exit 1; }
    # The listening socket is open before the master writes its pid file.
    local i
    for ((i = 0; i < 100; i++)); do
        [ -s "$NGINX_DIR/logs/nginx.pid" ] && break
        sleep 0.1
    done
    MASTER_PID=$(cat "$NGINX_DIR/logs/nginx.pid" 2>/dev/null || true)
    if [ -z "$MASTER_PID" ] || ! kill -0 "$MASTER_PID" 2>/dev/null; then
        log "$t: no nginx master pid"; cat "$NGINX_DIR/logs/error.log" >&2; exit 1
    fi
    for ((i = 0; i < 50; i++)); do
        [ "$(pgrep -P "$MASTER_PID" | wc -l)" -ge 2 ] && break
        sleep 0.1
    done
    sleep 1 # let the workers connect to Redis
    log "$t: nginx master $MASTER_PID, workers $(workers_of "$MASTER_PID"), $URL"
}

stop_target() { # target
    local t=$1
    stop_pid "$MASTER_PID" 15 QUIT
    MASTER_PID=""
    cat "$NGINX_DIR/logs/error.log" >> "$RAW/$t-error.log" 2>/dev/null || true
}

# ---------------------------------------------------------------- scenarios
if [ "$QUICK" = 1 ]; then
    RATES=(100 400 1600); FAN_DUR=4; LAT_DUR=8; ROOMS_DUR=8; IDLE_DUR=4; STORM_DUR=8
    BIG_RATES=(50 200 800); BIG_ROOM_CLIENTS=10000; MANY_IDLE=20000
else
    RATES=(50 100 200 400 600 800 1200 1600 2400); FAN_DUR=10; LAT_DUR=20; ROOMS_DUR=20; IDLE_DUR=10; STORM_DUR=20
    # 36,000 and not 40,000: a process may hold 20,000 files here, nginx's
    # worker_connections counts every connection, and the kernel's split
    # between the two workers is not exactly even (at 38,000 both servers
    # refused about 1.7% for want of a free connection).
    BIG_RATES=(25 50 100 200 400 600 800 1200 1600); BIG_ROOM_CLIENTS=10000; MANY_IDLE=36000
fi
SRC_MANY=$(seq -s, -f '127.0.0.%g' 10 17)

STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RAW="$WORK/raw"
mkdir -p "$RAW"
ANOMALIES="$RAW/anomalies.txt"
: > "$ANOMALIES"

# wschat-bench's target kind: the recipe, like nchan, sends the raw published
# text and takes the room as a URL suffix (which it ignores).
bench_kind() { case "$1" in module) echo module ;; *) echo nchan ;; esac; }

bench() { # target scenario [args...]: run one measurement, save its JSON
    local t=$1 s=$2
    shift 2
    local workers before after rc=0
    wait_quiet "$t $s"
    workers=$(workers_of "$MASTER_PID")
    timeout 600 "$BENCH" --target "$(bench_kind "$t")" --url "$URL" --server-pids "$workers" \
        --redis-pid "$REDIS_PID" --label "$t/$s" --json "$@" > "$RAW/$t-$s.json" 2> "$RAW/$t-$s.log" || rc=$?
    sed 's/^/    /' "$RAW/$t-$s.log" >&2
    [ "$rc" = 0 ] || echo "$t $s: wschat-bench exited $rc" >> "$ANOMALIES"
    after=$(workers_of "$MASTER_PID")
    if [ "$workers" != "$after" ]; then
        echo "$t $s: worker pids changed during the run ($workers -> $after): a worker died" >> "$ANOMALIES"
    fi
    sleep 2 # let closed connections go before the next run
    return 0
}

jq_get() { # file python-expression-on-r
    python3 -c 'import json,sys
try:
    r=json.load(open(sys.argv[1]))
    print(eval(sys.argv[2]))
except Exception:
    print("")' "$1" "$2"
}

# The module's product default: the access-log line after the 101, the
# HTTP request freed.
ACCESS_LOG=upgrade

run_target() {
    local t=$1
    log "=== $t ==="
    if [ "$t" = module ]; then
        # Idle memory once more with the HTTP request kept for an
        # end-of-session access-log line.
        ACCESS_LOG=close
        start_target "$t"
        log "$t (d) idle, websocket_chat_access_log close: 10000 connections, 100 rooms"
        bench "$t" idle-close --idle --clients 10000 --rooms 100 --procs 2 --duration "$IDLE_DUR" \
            --source-addrs "$SRC_B"
        stop_target "$t"
        ACCESS_LOG=upgrade
    fi
    start_target "$t"
    # (d) idle memory first, on fresh workers, so the before/after difference
    # is what the connections cost and not reuse of earlier heap.
    log "$t (d) idle: 10000 connections, 100 rooms, 2 client processes"
    bench "$t" idle --idle --clients 10000 --rooms 100 --procs 2 --duration "$IDLE_DUR" \
        --source-addrs "$SRC_B"
    # (a) fan-out steps. A step that misses "0 loss and p99 < 50 ms" is run
    # once more (one burst of noise should not end it); the steps go on while
    # they lose nothing, so both the latency-bound and the loss-free limits show.
    local rate pass lossless try
    for rate in "${RATES[@]}"; do
        for try in 1 2; do
            log "$t (a) fan-out: 1 room x 1000 clients, 10 publishers, $rate msg/s (try $try)"
            bench "$t" "fanout-$rate" --clients 1000 --rooms 1 --publishers 10 --rate "$rate" \
                --duration "$FAN_DUR" --warmup 2 --drain 3 --procs 2 --source-addrs "$SRC_A"
            pass=$(jq_get "$RAW/$t-fanout-$rate.json" \
                'int(r["deliveries"]["lost"]==0 and r["connections"]["failed"]==0 and (r["latency_ms"]["p99"] or 1e9) < 50)')
            [ "$pass" = 1 ] && break
            [ "$try" = 1 ] && cp "$RAW/$t-fanout-$rate.json" "$RAW/$t-fanoutfail1-$rate.json.txt"
        done
        lossless=$(jq_get "$RAW/$t-fanout-$rate.json" \
            'int(r["deliveries"]["lost"]==0 and r["connections"]["failed"]==0 and r["deliveries"]["expected"]>0)')
        [ "$lossless" = 1 ] || break
    done
    # (b) latency at a fixed rate.
    log "$t (b) latency: 1 room x 1000 clients, 100 msg/s"
    bench "$t" latency --clients 1000 --rooms 1 --publishers 10 --rate 100 \
        --duration "$LAT_DUR" --warmup 2 --drain 3 --procs 2 --source-addrs "$SRC_A"
    # (c) 10 rooms x 1000 clients, with (e) Redis connections sampled mid-window.
    log "$t (c) rooms: 10 rooms x 1000 clients, 100 msg/s in all"
    local idle_redis
    idle_redis=$(redis_clients)
    # (e) the highest count seen, sampled every second while (c) runs.
    (
        best=0
        while [ ! -e "$RAW/$t-rooms.done" ]; do
            n=$(redis_clients)
            [ "${n:-0}" -gt "$best" ] && best=$n
            echo "$best" > "$RAW/$t-redis-clients.txt"
            sleep 1
        done
    ) &
    local sampler=$!
    bench "$t" rooms --clients 10000 --rooms 10 --publishers 10 --rate 100 \
        --duration "$ROOMS_DUR" --warmup 3 --drain 3 --procs 2 --source-addrs "$SRC_ALL"
    touch "$RAW/$t-rooms.done"
    wait "$sampler" 2>/dev/null || true
    echo "$idle_redis" > "$RAW/$t-redis-idle.txt"
    # (f) connect / chat / close storm.
    log "$t (f) storm: 50 concurrent connect/chat/close loops, 10 rooms"
    bench "$t" storm --storm --clients 50 --rooms 10 --duration "$STORM_DUR" \
        --source-addrs "$SRC_STORM"
    # (g) CPU per delivery at one rate for every target (the fan-out steps
    # stop where a target starts losing messages).
    log "$t (g) cpu: 1 room x 1000 clients, 10 publishers, 400 msg/s"
    bench "$t" cpu --clients 1000 --rooms 1 --publishers 10 --rate 400 \
        --duration "$FAN_DUR" --warmup 2 --drain 3 --procs 2 --source-addrs "$SRC_A"
    # (j) 16 KB messages to 100 members, stepped until a step loses a
    # delivery or a member is closed.
    local brate
    for brate in "${BIG_RATES[@]}"; do
        log "$t (j) big messages: 16 KB x 100 members, $brate msg/s"
        bench "$t" "big-$brate" --clients 100 --rooms 1 --publishers 10 --payload 16384 \
            --rate "$brate" --duration "$FAN_DUR" --warmup 2 --drain 3 --procs 1 --source-addrs "$SRC_A"
        pass=$(jq_get "$RAW/$t-big-$brate.json" \
            'int(r["deliveries"]["lost"]==0 and r["deliveries"]["disconnects"]==0 and r["connections"]["failed"]==0 and r["deliveries"]["expected"]>0)')
        [ "$pass" = 1 ] || break
    done
    stop_target "$t"
    # (i) many idle connections, on fresh workers. The recipe holds a Redis
    # connection per client beside the client's own: twice the files, over
    # the limit of a process at this count.
    if [ "$t" != openresty ]; then
        start_target "$t"
        log "$t (i) idle: $MANY_IDLE connections, 380 rooms, 5 client processes"
        bench "$t" many-idle --idle --clients "$MANY_IDLE" --rooms 380 --procs 5 \
            --duration "$IDLE_DUR" --connect-timeout 60 --source-addrs "$SRC_MANY"
        stop_target "$t"
    fi
    # (h) one room of 10,000 members at 100 msg/s; the module with presence
    # on, as it is deployed (the others have no presence).
    if [ "$t" = module ]; then PRESENCE=on; fi
    start_target "$t"
    log "$t (h) big room: 1 room x $BIG_ROOM_CLIENTS clients, 10 publishers, 100 msg/s"
    bench "$t" big-room --clients "$BIG_ROOM_CLIENTS" --rooms 1 --publishers 10 --rate 100 \
        --duration "$LAT_DUR" --warmup 3 --drain 3 --procs 2 --source-addrs "$SRC_ALL"
    stop_target "$t"
    PRESENCE=$PRESENCE_DEFAULT
    local errs
    errs=$(grep -cE '\[(alert|crit|emerg)\]|exited on signal|segfault' "$RAW/$t-error.log" 2>/dev/null || true)
    if [ "${errs:-0}" != 0 ]; then
        echo "$t: $errs alert/crit/emerg lines in the error log, e.g.:" >> "$ANOMALIES"
        grep -E '\[(alert|crit|emerg)\]|exited on signal|segfault' "$RAW/$t-error.log" | head -5 | sed 's/^/    /' >> "$ANOMALIES"
    fi
}

T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
CMDLINE="bash bench/compare.sh $ORIG_ARGS"
for t in "${TARGETS[@]}"; do
    run_target "$t"
done
ELAPSED=$(( $(date +%s) - T0 ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
MD="$OUT/compare-$STAMP.md"
JS="$OUT/compare-$STAMP.json"
python3 - "$RAW" "$MD" "$JS" "$ELAPSED" "$QUICK" "$MODULE_SHA" "$NCHAN_MODE" "${TARGETS[*]}" \
    "$CMDLINE" "$LOAD_START" "$LOAD_END" "${RATES[*]}" "$PRESENCE" <<'PYEOF'
import glob, json, os, sys, platform
raw, md_path, js_path, elapsed, quick, sha, nmode, targets, cmdline, load0, load1, rates_s, presence = sys.argv[1:14]
RATES = [int(x) for x in rates_s.split()]
targets = targets.split()

def load(t, s):
    try:
        with open(os.path.join(raw, f"{t}-{s}.json")) as f:
            return json.load(f)
    except Exception:
        return None

def read(path):
    try:
        return open(path).read().strip()
    except Exception:
        return ""

data = {t: {} for t in targets}
for t in targets:
    for p in sorted(glob.glob(os.path.join(raw, f"{t}-*.json"))):
        s = os.path.basename(p)[len(t) + 1:-5]
        data[t][s] = load(t, s)

def g(r, *path):
    for k in path:
        if r is None:
            return None
        r = r.get(k) if isinstance(r, dict) else None
    return r

rows = []  # (section, metric, {target: value}, better: "hi"|"lo"|None, fmt)

def fanout_steps(t):
    steps = []
    for s, r in data[t].items():
        if s.startswith("fanout-") and r:
            steps.append((int(s.split("-")[1]), r))
    return sorted(steps)

def passes(r):
    return (g(r, "deliveries", "lost") == 0 and g(r, "connections", "failed") == 0
            and (g(r, "latency_ms", "p99") or 1e9) < 50)

def lossless(r):
    return (g(r, "deliveries", "lost") == 0 and g(r, "connections", "failed") == 0
            and (g(r, "deliveries", "expected") or 0) > 0)

def highest(t, ok):
    # the highest rate such that it and every lower step passed
    b = 0
    for rate, r in fanout_steps(t):
        if not ok(r):
            break
        b = rate
    return b

best = {t: highest(t, passes) for t in targets}
best_ll = {t: highest(t, lossless) for t in targets}
top = {t: max([0] + [rate for rate, _ in fanout_steps(t)]) for t in targets}
rows.append(("(a) fan-out 1 room x 1000, 10 publishers", "highest rate with 0 loss and p99 < 50 ms (msg/s)", best, "hi"))
rows.append(("", "deliveries/s at that rate", {t: best[t] * 1000 for t in targets}, "hi"))
rows.append(("", "highest rate with 0 loss, any latency (msg/s)", {t: (f"≥{best_ll[t]}" if best_ll[t] and best_ll[t] == top[t] and best_ll[t] == max(RATES) else best_ll[t]) for t in targets}, "hi"))

def add(section, metric, scen, path, better):
    rows.append((section, metric, {t: g(data[t].get(scen), *path) for t in targets}, better))

add("(b) latency 1 room x 1000, 100 msg/s", "p50 ms", "latency", ["latency_ms", "p50"], "lo")
add("", "p99 ms", "latency", ["latency_ms", "p99"], "lo")
add("", "p99.9 ms", "latency", ["latency_ms", "p999"], "lo")
add("", "max ms", "latency", ["latency_ms", "max"], "lo")
add("", "lost deliveries", "latency", ["deliveries", "lost"], "lo")
add("", "server CPU, % of one core", "latency", ["cpu", "server_pct"], "lo")
add("", "Redis CPU, % of one core", "latency", ["cpu", "redis_pct"], "lo")
add("", "(noise) other processes' CPU %", "latency", ["cpu", "others_pct"], None)
add("(c) 10 rooms x 1000, 100 msg/s in all", "lost deliveries", "rooms", ["deliveries", "lost"], "lo")
add("", "expected deliveries", "rooms", ["deliveries", "expected"], None)
add("", "misrouted deliveries (another room's messages)", "rooms", ["deliveries", "misrouted"], "lo")
add("", "p50 ms", "rooms", ["latency_ms", "p50"], "lo")
add("", "p99 ms", "rooms", ["latency_ms", "p99"], "lo")
add("", "connect time p50 ms (10k clients)", "rooms", ["connections", "connect_ms", "p50"], "lo")
add("", "connect time p99 ms", "rooms", ["connections", "connect_ms", "p99"], "lo")
add("", "server CPU, % of one core", "rooms", ["cpu", "server_pct"], "lo")
add("", "Redis CPU, % of one core", "rooms", ["cpu", "redis_pct"], "lo")
add("", "(noise) other processes' CPU %", "rooms", ["cpu", "others_pct"], None)
add("(d) idle 10,000 connections (100 rooms)", "RSS bytes / connection (all workers)", "idle", ["memory", "per_connection_rss_bytes"], "lo")
add("", "PSS bytes / connection (all workers)", "idle", ["memory", "per_connection_pss_bytes"], "lo")
rows.append(("", "RSS bytes / connection, module with `websocket_chat_access_log close`",
             {t: g(data[t].get("idle-close" if t == "module" else "idle"), "memory", "per_connection_rss_bytes") for t in targets}, "lo"))
add("", "connections ok", "idle", ["connections", "ok"], "hi")
add("", "connect time p50 ms", "idle", ["connections", "connect_ms", "p50"], "lo")
add("", "connect time p99 ms", "idle", ["connections", "connect_ms", "p99"], "lo")

def intval(s):
    try:
        return int(s)
    except Exception:
        return None
rows.append(("(e) Redis connections", "CLIENT LIST count, max during (c)", {t: intval(read(os.path.join(raw, f"{t}-redis-clients.txt"))) for t in targets}, "lo"))
rows.append(("", "CLIENT LIST count before (c)", {t: intval(read(os.path.join(raw, f"{t}-redis-idle.txt"))) for t in targets}, None))
add("(f) connect/chat/close storm, 50 loops", "sessions / s", "storm", ["storm", "sessions_per_s"], "hi")
add("", "failed sessions", "storm", ["storm", "sessions_failed"], "lo")
add("", "session p50 ms", "storm", ["storm", "session_ms", "p50"], "lo")
add("", "session p99 ms", "storm", ["storm", "session_ms", "p99"], "lo")
add("", "server CPU, % of one core", "storm", ["cpu", "server_pct"], None)

def per_million(t, scen, key):
    r = data[t].get(scen)
    got = g(r, "deliveries", "received")
    v = g(r, "cpu", key)
    if not got or v is None:
        return None
    return round(v / got * 1e6, 2)

rows.append(("(g) CPU per delivery, 1 room x 1000, 400 msg/s", "worker user CPU s per million deliveries", {t: per_million(t, "cpu", "server_user_s") for t in targets}, "lo"))
rows.append(("", "worker system CPU s per million deliveries", {t: per_million(t, "cpu", "server_sys_s") for t in targets}, "lo"))
rows.append(("", "worker user + system s per million deliveries", {t: per_million(t, "cpu", "server_s") for t in targets}, "lo"))
add("", "lost deliveries", "cpu", ["deliveries", "lost"], "lo")
add("", "p99 ms", "cpu", ["latency_ms", "p99"], "lo")
add("(h) 1 room x 10,000, 100 msg/s (module: presence on)", "lost deliveries", "big-room", ["deliveries", "lost"], "lo")
add("", "expected deliveries", "big-room", ["deliveries", "expected"], None)
add("", "p50 ms", "big-room", ["latency_ms", "p50"], "lo")
add("", "p99 ms", "big-room", ["latency_ms", "p99"], "lo")
add("", "server CPU, % of one core", "big-room", ["cpu", "server_pct"], "lo")
add("", "client CPU, % of one core", "big-room", ["cpu", "client_pct"], None)
add("(i) idle, many connections (380 rooms)", "connections ok", "many-idle", ["connections", "ok"], "hi")
add("", "RSS bytes / connection (all workers)", "many-idle", ["memory", "per_connection_rss_bytes"], "lo")
add("", "PSS bytes / connection (all workers)", "many-idle", ["memory", "per_connection_pss_bytes"], "lo")
rows.append(("", "connections / s during the ramp", {t: (round(g(data[t].get("many-idle"), "connections", "ok") / g(data[t].get("many-idle"), "connections", "connect_phase_s")) if g(data[t].get("many-idle"), "connections", "connect_phase_s") else None) for t in targets}, "hi"))
add("", "connect time p99 ms", "many-idle", ["connections", "connect_ms", "p99"], "lo")

def big_steps(t):
    return sorted((int(s.split("-")[1]), r) for s, r in data[t].items() if s.startswith("big-") and s != "big-room" and r)

def big_ok(r):
    return (g(r, "deliveries", "lost") == 0 and g(r, "deliveries", "disconnects") == 0
            and g(r, "connections", "failed") == 0 and (g(r, "deliveries", "expected") or 0) > 0)

def big_best(t):
    b = None
    for rate, r in big_steps(t):
        if not big_ok(r):
            break
        b = (rate, r)
    return b

def big_mbps(t):
    b = big_best(t)
    if not b:
        return None
    rate, r = b
    return round(g(r, "deliveries", "received") * 16384 / (g(r, "cpu", "window_s") or 1) / 1e6, 1)

rows.append(("(j) 16 KB messages, 1 room x 100", "highest rate with no loss and nobody closed (msg/s)", {t: (big_best(t) or (0, None))[0] for t in targets}, "hi"))
rows.append(("", "MB/s of deliveries at that rate", {t: big_mbps(t) for t in targets}, "hi"))
rows.append(("", "p99 ms at that rate", {t: g((big_best(t) or (0, None))[1], "latency_ms", "p99") for t in targets}, "lo"))

def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v == int(v) and abs(v) >= 100:
            return f"{int(v):,}"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)

def num(v):
    if isinstance(v, str) and v.startswith("≥"):
        return int(v[1:])
    return v

# One ratio column per other target, module against it, when the module ran.
others = [t for t in targets if t != "module"] if "module" in targets else []

def ratio(vals, better, other):
    if better is None:
        return ""
    m, n = num(vals.get("module")), num(vals.get(other))
    lower_bound = isinstance(vals.get("module"), str) and str(vals.get("module")).startswith("≥")
    if not isinstance(m, (int, float)) or not isinstance(n, (int, float)):
        return "n/a"
    if better == "hi":
        if m and not n:
            return "inf"
        if not m and not n:
            return "-"
        return ("≥" if lower_bound else "") + f"{m / n:.2f}"
    if m == 0 and n == 0:
        return "="
    if m == 0:
        return "inf"
    return f"{n / m:.2f}"

NAMES = {"module": "websocket_chat module", "nchan": "nchan", "openresty": "the OpenResty chat recipe"}
out = []
out.append(f"# {' vs '.join(NAMES[t] for t in targets)} ({'quick' if quick == '1' else 'full'} run)\n")
out.append(f"Command: `{cmdline.strip()}`. Machine: {os.cpu_count()} cores, Linux {platform.release()}; load average {load0} at the start, {load1} at the end. Elapsed {elapsed}s.\n")
desc = []
if "module" in targets:
    desc.append(f"Module .so sha256 {sha}…, with the nginx cargo built beside it, `websocket_chat_presence {presence}`")
if "nchan" in targets:
    desc.append(f"nchan: Debian's nginx + libnginx-mod-nchan, `nchan_pubsub websocket` per room, `nchan_redis_storage_mode {nmode}` (defaults otherwise)")
if "openresty" in targets:
    desc.append(f"openresty: the classic chat recipe (bench/openresty/chat.lua: a subscriber light thread per client on one global Redis channel, a fresh Redis connection per published message), {os.environ.get('OPENRESTY_DESC', '')}")
out.append("; ".join(desc) + f". {'All' if len(targets) > 1 else 'Run with'}: 2 workers, the same private Redis, one target running at a time, clients (wschat-bench) on the same machine.\n")
header = "| scenario | metric | " + " | ".join(targets) + " |" + "".join(f" module vs {o} (>1 = module better) |" for o in others)
out.append(header)
out.append("|" + "---|" * (2 + len(targets) + len(others)))
for section, metric, vals, better in rows:
    cells = [fmt(vals.get(t)) for t in targets]
    line = f"| {section} | {metric} | " + " | ".join(cells) + " |"
    for o in others:
        line += f" {ratio(vals, better, o)} |"
    out.append(line)
out.append("")
if others:
    out.append("Ratios: module/other for throughput-like rows (higher is better), other/module for latency, loss, memory, CPU, connection counts (lower is better); 'inf' = the module is 0 where the other is not, '=' = both 0.\n")
if "openresty" in targets:
    out.append("openresty: the recipe has one global channel, so in (c) every client receives every room's messages: 10 times the deliveries the others make (the other rooms' ones are counted as misrouted, only its own room's as expected). Its (c) rows measure the recipe with that extra work, kept as the recipe is, not room routing; a message still in the backlog at the end of the drain counts as lost. Its (e) count is one subscriber connection per client plus one per message being published (one at a time per publisher). The scenarios fit the 20,000-file limit of a process (an nginx worker holds about 5,000 clients and their 5,000 subscriber connections in (c) and (d); Redis runs with `--maxclients` 19,900), so none was left out.\n")
out.append("## (a) fan-out steps\n")
out.append("| rate msg/s | " + " | ".join(f"{t}: lost / p50 / p99 / p99.9 ms (others' CPU %)" for t in targets) + " |")
out.append("|---|" + "---|" * len(targets))
rates = sorted({rate for t in targets for rate, _ in fanout_steps(t)})
for rate in rates:
    cells = []
    for t in targets:
        r = data[t].get(f"fanout-{rate}")
        if not r:
            cells.append("not run")
        else:
            cell = f"{fmt(g(r,'deliveries','lost'))} / {fmt(g(r,'latency_ms','p50'))} / {fmt(g(r,'latency_ms','p99'))} / {fmt(g(r,'latency_ms','p999'))} ({fmt(g(r,'cpu','others_pct'))})" + ("" if passes(r) else " ✗")
            first = os.path.join(raw, f"{t}-fanoutfail1-{rate}.json.txt")
            if os.path.exists(first):
                try:
                    f1 = json.load(open(first))
                    cell += f"; first try ✗ {fmt(g(f1,'deliveries','lost'))} / {fmt(g(f1,'latency_ms','p50'))} / {fmt(g(f1,'latency_ms','p99'))} / {fmt(g(f1,'latency_ms','p999'))}"
                except Exception:
                    pass
            cells.append(cell)
    out.append(f"| {rate} | " + " | ".join(cells) + " |")
out.append("")
out.append("Latency is receive time minus the message's scheduled send time (open loop: a stalled server cannot hide behind coordinated omission); it includes the client's own scheduling (the load generator shares the 2 cores with the servers and Redis). A step missing '0 loss and p99 < 50 ms' is run once more (✗ = failed both times); steps continue while they lose nothing; '≥' = no loss even at the last step. 'others' = CPU used in the window by processes other than the server workers, the clients and Redis (e.g. a build), in % of one core.\n")
anom = read(os.path.join(raw, "anomalies.txt"))
errs = []
for t in targets:
    for s, r in data[t].items():
        if r and (g(r, "error_count") or 0) > 0:
            errs.append(f"- {t} {s}: {g(r,'error_count')} client-side errors, e.g. {'; '.join(str(e) for e in (g(r,'errors') or [])[:3])}")
        if r and (g(r, "deliveries", "disconnects") or 0) > 0:
            errs.append(f"- {t} {s}: {g(r,'deliveries','disconnects')} connections closed by the server during the run")
out.append("## Anomalies\n")
out.append((anom + "\n" if anom else "") + ("\n".join(errs) if errs else ("" if anom else "none seen")))
out.append("")
md = "\n".join(out)
with open(md_path, "w") as f:
    f.write(md)
with open(js_path, "w") as f:
    json.dump({"targets": targets, "quick": quick == "1", "module_sha256_prefix": sha,
               "nchan_storage_mode": nmode, "openresty": os.environ.get("OPENRESTY_DESC", "") if "openresty" in targets else None,
               "elapsed_s": int(elapsed), "runs": data,
               "redis_clients": {t: {"during_c": read(os.path.join(raw, f"{t}-redis-clients.txt")),
                                     "before_c": read(os.path.join(raw, f"{t}-redis-idle.txt"))} for t in targets},
               "anomalies": anom}, f, indent=1)
print(md)
PYEOF
# Keep the error logs next to the results: their first 2,000 lines (the
# recipe's log one timeout line per idle client), and how many there were.
for t in "${TARGETS[@]}"; do
    if [ -f "$RAW/$t-error.log" ]; then
        { head -n 2000 "$RAW/$t-error.log"
          echo "# $(wc -l < "$RAW/$t-error.log") lines in all"; } > "$OUT/compare-$STAMP-$t-error.log"
    fi
done
log "results: $MD, $JS"
