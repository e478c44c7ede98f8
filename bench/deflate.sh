#!/usr/bin/env bash
# permessage-deflate in the fan-out: the same load (1 room x 1000 members, 10
# publishers) against one module nginx with `websocket_chat_deflate on`, once
# with members that offer the extension and once with members that do not.
# Reports, per run: bytes the workers wrote to clients (websocket_chat_status
# bytes_sent), worker CPU (user + system, from wschat-bench), deliveries,
# loss and p99; then idle memory per connection for 5000 members each way.
# The load generator inflates every message it receives, so with deflate its
# own CPU, not the server, bounds the rate it can measure (and its latency):
# the default rate stays where it keeps up.
#
#   bash bench/deflate.sh [--rate N] [--payload BYTES] [--duration S]
#
# The messages are wschat-bench's (`wsb <publisher> <seq> <times> …` padded
# with `x` to --payload bytes, in the module's JSON envelope); padding
# compresses better than chat text, so keep --payload small for a fair
# picture. Needs redis-server and a release build (cargo build --release).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$WSCHAT_ROOT"

RATE=100 PAYLOAD=100 DURATION=10
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE=$2; shift 2 ;;
        --payload) PAYLOAD=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        *) log "unknown argument $1"; exit 2 ;;
    esac
done

cargo build --release --locked >&2
NGINX=$(nginx_bin)
MODULE=$(chat_module)
BENCH=$(target_dir)/release/wschat-bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wschat-deflate.XXXXXX")
REDIS_PORT=$(free_port)
PORT=$(free_port)
cleanup() {
    [ -f "$WORK/logs/nginx.pid" ] && "$NGINX" -p "$WORK" -c conf/nginx.conf -s stop 2>/dev/null || true
    [ -f "$WORK/redis.pid" ] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --daemonize yes \
    --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
wait_tcp 127.0.0.1 "$REDIS_PORT" 5

mkdir -p "$WORK/logs" "$WORK/conf"
cat > "$WORK/conf/nginx.conf" <<EOF
load_module $MODULE;
worker_processes 2;
worker_rlimit_nofile 19500;
pid $WORK/logs/nginx.pid;
error_log $WORK/logs/error.log warn;
events { worker_connections 19000; }
http {
    access_log off;
    websocket_chat_redis 127.0.0.1:$REDIS_PORT;
    server {
        listen 127.0.0.1:$PORT backlog=4096;
        location = /ws {
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_user \$arg_nick;
            websocket_chat_presence off;
            websocket_chat_deflate on;
        }
        location = /status { websocket_chat_status; }
    }
}
EOF
# Fresh workers for each idle measurement: memory a run before freed and
# kept would make the next look cheaper than it is.
start_nginx() {
    "$NGINX" -p "$WORK" -c conf/nginx.conf
    wait_tcp 127.0.0.1 "$PORT" 5
    until workers=$(pgrep -P "$(cat "$WORK/logs/nginx.pid")" | paste -sd, -) && [ -n "$workers" ]; do
        sleep 0.1
    done
}
stop_nginx() {
    local pid
    pid=$(cat "$WORK/logs/nginx.pid")
    "$NGINX" -p "$WORK" -c conf/nginx.conf -s quit
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
start_nginx

bytes_sent() {
    python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]))["bytes_sent"])' \
        "http://127.0.0.1:$PORT/status"
}

# run <label> [wschat-bench flags]: one fan-out, one result line.
run() {
    local label=$1 before after
    shift
    before=$(bytes_sent)
    "$BENCH" --target module --url "ws://127.0.0.1:$PORT/ws" --server-pids "$workers" \
        --clients 1000 --rooms 1 --publishers 10 --rate "$RATE" --payload "$PAYLOAD" \
        --duration "$DURATION" --warmup 2 --drain 3 --procs 2 --json "$@" \
        > "$WORK/$label.json" 2> "$WORK/$label.log"
    after=$(bytes_sent)
    python3 - "$WORK/$label.json" "$label" "$((after - before))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
d, c, l = r["deliveries"], r["cpu"], r["latency_ms"]
sent = int(sys.argv[3])
print(f"| {sys.argv[2]} | {sent / 1e6:.1f} MB | {sent / max(d['received'] + d['warmup_received'], 1):.0f} B"
      f" | {c['server_s']:.2f} s | {c['server_s'] / max(d['received'], 1) * 1e6:.2f} s"
      f" | {d['received']:,} | {d['lost']:,} | {l['p99']:.1f} ms |")
PY
    sleep 2
}

# idle <label> [flags]: memory per connection for 5000 idle members.
idle() {
    local label=$1
    shift
    stop_nginx
    start_nginx
    "$BENCH" --target module --url "ws://127.0.0.1:$PORT/ws" --server-pids "$workers" \
        --idle --clients 5000 --rooms 50 --duration 5 --procs 1 --json "$@" \
        > "$WORK/idle-$label.json" 2> "$WORK/idle-$label.log"
    python3 - "$WORK/idle-$label.json" "$label" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["memory"]
print(f"| {sys.argv[2]} | {m['per_connection_rss_bytes']:,.0f} B |")
PY
    sleep 2
}

echo "fan-out: 1 room x 1000 members, 10 publishers, $RATE msg/s, --payload $PAYLOAD, ${DURATION}s measured"
echo
echo "| members | bytes written | per delivery | worker CPU | CPU per million deliveries | deliveries | lost | p99 |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
run plain
run deflate --deflate
echo
echo "| idle members | RSS per connection |"
echo "| --- | --- |"
idle plain
idle deflate --deflate
