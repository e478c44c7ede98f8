#!/usr/bin/env bash
# Side-by-side benchmark: this repository's websocket_chat module vs nchan
# (Debian's nginx + libnginx-mod-nchan), both bridged to the same private
# Redis, same scenarios, same load generator (bench/, wschat-bench).
#
#   bash bench/compare.sh            # full run, ~10-15 minutes
#   bash bench/compare.sh --quick    # ~3-4 minutes, shorter windows, fewer steps
#
# Options:
#   --quick            shorter runs
#   --only module|nchan  run one target (the table then has one column)
#   --build            run `cargo build --release` (module + nginx + bench) first;
#                      without it, only the bench crate is built, and the module is
#                      built only when its artefacts are missing
#   --out DIR          where results go (default bench/results)
#   --nchan-mode M     nchan_redis_storage_mode: distributed (default) or nostore
#   --presence on|off  the module's websocket_chat_presence (default off: nchan
#                      sends no join/leave events, so both do the same work)
#
# Needs root for apt-get when nginx, libnginx-mod-nchan or redis-server are
# missing. Everything listens on 127.0.0.1 only; every run is bounded in time.
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
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --build) BUILD=1 ;;
        --only) ONLY=$2; shift ;;
        --out) OUT=$2; shift ;;
        --nchan-mode) NCHAN_MODE=$2; shift ;;
        --presence) PRESENCE=$2; shift ;;
        -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case "$NCHAN_MODE" in distributed|nostore) ;; *) echo "compare.sh: --nchan-mode distributed|nostore" >&2; exit 2 ;; esac
TARGETS=(module nchan)
[ -n "$ONLY" ] && TARGETS=("$ONLY")

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- packages
ensure_packages() {
    local missing=() p
    for p in nginx libnginx-mod-nchan redis-server redis-tools; do
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

wait_tcp() { # host port secs
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

stop_pid() { # pid [secs] [signal]
    local pid=$1 secs=${2:-10} sig=${3:-TERM} i
    [ -n "$pid" ] || return 0
    kill -"$sig" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

workers_of() { [ -n "$1" ] && pgrep -P "$1" | paste -sd, - || true; }

# Busy CPU ticks of the whole machine (USER_HZ = 100 per core-second).
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }

# Wait up to 60 s for the machine to be quiet (under 25% of a core busy over
# one second) so that a build or test running beside us spoils fewer numbers.
wait_quiet() {
    local i a b
    for ((i = 0; i < 60; i++)); do
        a=$(busy_ticks); sleep 1; b=$(busy_ticks)
        [ $((b - a)) -lt 25 ] && return 0
    done
    log "the machine is still busy with other processes; measuring anyway"
    echo "$1: started while other processes kept the machine busy (see 'others' CPU)" >> "$ANOMALIES"
}

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
BENCH="$WORK/wschat-bench"
NCHAN_NGINX=/usr/sbin/nginx
MODULE_SHA=$(sha256sum "$WORK/module.so" | cut -c1-16)

# Loopback source addresses for the clients (127.0.0.0/8 is all local on Linux).
SRC_A=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4
SRC_B=127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8
SRC_ALL=$SRC_A,$SRC_B
SRC_STORM=$(seq -s, -f '127.0.0.%g' 1 16)

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log" \
    --dir "$WORK" --maxclients 10000 >/dev/null
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
        if [ "$t" = module ]; then
            echo "load_module $WORK/module.so;"
        else
            echo "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;"
        fi
        cat <<EOF
worker_processes 2;
# 10k+ connections per worker within the 20,000-file limit of a process.
worker_rlimit_nofile 19500;
pid $d/logs/nginx.pid;
error_log $d/logs/error.log warn;
events {
    worker_connections 19000;
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
        listen 127.0.0.1:$port backlog=4096;
        location = /ws {
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_user \$arg_nick;
            # nchan has no join/leave events: compare pub/sub alike.
            websocket_chat_presence $PRESENCE;
            websocket_chat_access_log $ACCESS_LOG;
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
        listen 127.0.0.1:$port backlog=4096;
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
    if [ "$t" = module ]; then bin="$WORK/nginx-module"; URL="ws://127.0.0.1:$PORT/ws"
    else bin="$NCHAN_NGINX"; URL="ws://127.0.0.1:$PORT/sub"; fi
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
else
    RATES=(50 100 200 400 600 800 1200 1600 2400); FAN_DUR=10; LAT_DUR=20; ROOMS_DUR=20; IDLE_DUR=10; STORM_DUR=20
fi

STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RAW="$WORK/raw"
mkdir -p "$RAW"
ANOMALIES="$RAW/anomalies.txt"
: > "$ANOMALIES"

bench() { # target scenario [args...]: run one measurement, save its JSON
    local t=$1 s=$2
    shift 2
    local workers before after rc=0
    wait_quiet "$t $s"
    workers=$(workers_of "$MASTER_PID")
    timeout 600 "$BENCH" --target "$t" --url "$URL" --server-pids "$workers" \
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
    stop_target "$t"
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

def ratio(vals, better):
    if better is None or len(targets) != 2:
        return ""
    m, n = num(vals.get("module")), num(vals.get("nchan"))
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

out = []
out.append(f"# websocket_chat module vs nchan ({'quick' if quick == '1' else 'full'} run)\n")
out.append(f"Command: `{cmdline.strip()}`. Machine: {os.cpu_count()} cores, Linux {platform.release()}; load average {load0} at the start, {load1} at the end. Elapsed {elapsed}s.\n")
out.append(f"Module .so sha256 {sha}…, with the nginx cargo built beside it, `websocket_chat_presence {presence}`; nchan: Debian's nginx + libnginx-mod-nchan, `nchan_pubsub websocket` per room, `nchan_redis_storage_mode {nmode}` (defaults otherwise). Both: 2 workers, the same private Redis, one target running at a time, clients (wschat-bench) on the same machine.\n")
header = "| scenario | metric | " + " | ".join(targets) + (" | ratio (>1 = module better) |" if len(targets) == 2 else " |")
out.append(header)
out.append("|" + "---|" * (2 + len(targets) + (1 if len(targets) == 2 else 0)))
for section, metric, vals, better in rows:
    cells = [fmt(vals.get(t)) for t in targets]
    line = f"| {section} | {metric} | " + " | ".join(cells) + " |"
    if len(targets) == 2:
        line += f" {ratio(vals, better)} |"
    out.append(line)
out.append("")
out.append("Ratios: module/nchan for throughput-like rows (higher is better), nchan/module for latency, loss, memory, CPU, connection counts (lower is better); 'inf' = the module is 0 where nchan is not, '=' = both 0.\n")
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
               "nchan_storage_mode": nmode, "elapsed_s": int(elapsed), "runs": data,
               "redis_clients": {t: {"during_c": read(os.path.join(raw, f"{t}-redis-clients.txt")),
                                     "before_c": read(os.path.join(raw, f"{t}-redis-idle.txt"))} for t in targets},
               "anomalies": anom}, f, indent=1)
print(md)
PYEOF
# Keep the error logs next to the results.
for t in "${TARGETS[@]}"; do
    [ -f "$RAW/$t-error.log" ] && cp "$RAW/$t-error.log" "$OUT/compare-$STAMP-$t-error.log"
done
log "results: $MD, $JS"
