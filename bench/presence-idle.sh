#!/usr/bin/env bash
# What presence costs in a big room: N idle clients (default 10,000) join one
# room on 2 workers, with websocket_chat_presence on and off, in both
# access-log modes. Prints the workers' memory per connection and the
# presence events (join/leave/presence) the members received, in all and at
# most on one connection. Uses the module and nginx that cargo built, a
# private redis-server and wschat-bench; about a minute per row.
#
#   bash bench/presence-idle.sh [clients]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$WSCHAT_ROOT"

N=${1:-10000}
TD=$(target_dir)
cargo build --release >&2
cargo build --release -p wschat-bench >&2
NGINX=$(nginx_bin)
MODULE=$(chat_module)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/presence-idle.XXXXXX")
trap 'redis-cli -p "$RP" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --dir "$WORK" --logfile "$WORK/redis.log"
wait_tcp 127.0.0.1 "$RP" 5

printf '| presence | access log | connections | RSS bytes / connection | presence events | most on one connection |\n'
printf '| --- | --- | --- | --- | --- | --- |\n'
for presence in on off; do
    for access_log in upgrade close; do
        d="$WORK/$presence-$access_log"
        mkdir -p "$d/logs"
        port=$(free_port)
        redis-cli -p "$RP" flushall >/dev/null
        cat > "$d/nginx.conf" <<EOF
load_module $MODULE;
worker_processes 2;
worker_rlimit_nofile 20000;
error_log $d/logs/error.log warn;
pid $d/logs/nginx.pid;
events { worker_connections 19000; }
http {
    access_log off;
    client_body_temp_path $d/tmp; proxy_temp_path $d/tmp; fastcgi_temp_path $d/tmp;
    uwsgi_temp_path $d/tmp; scgi_temp_path $d/tmp;
    websocket_chat_redis 127.0.0.1:$RP;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /ws {
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_user \$arg_nick;
            websocket_chat_presence $presence;
            websocket_chat_access_log $access_log;
        }
    }
}
EOF
        "$NGINX" -p "$d" -c "$d/nginx.conf"
        wait_tcp 127.0.0.1 "$port" 5
        pids=$(pgrep -P "$(cat "$d/logs/nginx.pid")" | paste -sd,)
        "$TD/release/wschat-bench" --url "ws://127.0.0.1:$port/ws" --idle --clients "$N" \
            --rooms 1 --procs 2 --duration 10 --server-pids "$pids" \
            --source-addrs 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4 --json \
            > "$d/report.json" 2> "$d/bench.log"
        "$NGINX" -p "$d" -c "$d/nginx.conf" -s quit
        python3 - "$d/report.json" "$presence" "$access_log" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
d, c, m = r["deliveries"], r["connections"], r["memory"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {c['ok']} ({c['failed']} failed) | "
      f"{m['per_connection_rss_bytes']:.0f} | {d['presence_events']} | "
      f"{d['presence_events_max_per_connection']} |")
EOF
    done
done
