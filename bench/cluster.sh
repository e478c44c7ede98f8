#!/usr/bin/env bash
# The same fan-out load against one Redis and against a 3-shard Redis Cluster
# (3 primaries, no replicas), through the websocket_chat module on nginx with
# 2 workers; the nginx configs differ only in the websocket_chat_redis line
# (`127.0.0.1:P` vs `cluster=127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`).
#
#   bash bench/cluster.sh            # full run: 2 x (single, cluster), 60 s windows, ~6 min
#   bash bench/cluster.sh --quick    # 5 s windows, ~1 min: checks that the script works
#
# Options:
#   --quick              short windows
#   --runs N             rounds of (single, cluster), alternating (default 2)
#   --rooms R            rooms (default 30)
#   --members M          members per room (default 100): R x M clients
#   --publishers P       publishing clients (default R: one per room)
#   --rate MSGS          aggregate messages per second over all publishers (default 2000:
#                        x members = 200,000 deliveries/s)
#   --duration SECS      measured window (default 60, --quick 5)
#   --presence on|off    websocket_chat_presence (default off, as in compare.sh)
#   --out DIR            where results go (default bench/results)
#
# Needs redis-server 7+ and redis-cli (installed when missing, as root), python3,
# and the module built (target/release/nginx and libngx_http_websocket_chat_module.so;
# this script never builds the module; it builds wschat-bench only if missing).
# Everything listens on 127.0.0.1; every run is bounded in time; all Redis
# servers and nginx are private to a temp dir and stopped at the end.
# Results: bench/results/cluster-<date>.md (the table) and .json (raw reports).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ORIG_ARGS="$*"
QUICK=0
RUNS=2
ROOMS=30
MEMBERS=100
PUBLISHERS=""
RATE=2000
DURATION=""
PRESENCE=off
OUT="$ROOT/bench/results"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --runs) RUNS=$2; shift ;;
        --rooms) ROOMS=$2; shift ;;
        --members) MEMBERS=$2; shift ;;
        --publishers) PUBLISHERS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --presence) PRESENCE=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n "2,/^set -euo/p" "${BASH_SOURCE[0]}" | sed "\$d"; exit 0 ;;
        *) echo "cluster.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
for v in RUNS ROOMS MEMBERS RATE; do
    [[ "${!v}" =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || { echo "cluster.sh: --${v,,} wants a positive integer" >&2; exit 2; }
done
[ "$RUNS" -le 10 ] || { echo "cluster.sh: --runs at most 10" >&2; exit 2; }
case "$PRESENCE" in on|off) ;; *) echo "cluster.sh: --presence on|off" >&2; exit 2 ;; esac
PUBLISHERS=${PUBLISHERS:-$ROOMS}
CLIENTS=$((ROOMS * MEMBERS))
[ "$CLIENTS" -le 16000 ] || { echo "cluster.sh: at most 16000 clients (rooms x members)" >&2; exit 2; }
if [ "$QUICK" = 1 ]; then
    DURATION=${DURATION:-5}; WARMUP=1; DRAIN=1; QUIET_MAX=5
else
    DURATION=${DURATION:-60}; WARMUP=3; DRAIN=3; QUIET_MAX=30
fi
[[ "$DURATION" =~ ^[0-9]+$ ]] && [ "$DURATION" -ge 1 ] && [ "$DURATION" -le 300 ] \
    || { echo "cluster.sh: --duration 1..300" >&2; exit 2; }
# Fixed room names (the channels are wschat:{cr0} ... ), so that every run
# puts the same rooms on the same shards; Redis is flushed before each run.
ROOM_PREFIX=cr

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- packages
ensure_packages() {
    local missing=() p
    for p in redis-server redis-tools; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || { log "missing packages: ${missing[*]} (run as root)"; exit 1; }
    log "installing: ${missing[*]}"
    # Keep Debian's maintainer scripts from starting redis (6379) as a service.
    local guard=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    local rc=0
    env DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
    [ "$rc" = 0 ] && { env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || rc=$?; }
    [ "$guard" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || exit 1
}

# ---------------------------------------------------------------- helpers
# N distinct free TCP ports on 127.0.0.1 below the ephemeral range.
free_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
n, got, tries = int(sys.argv[1]), [], 0
while len(got) < n and tries < 2000:
    tries += 1
    p = random.randint(20000, 32000)
    if p in got:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); got.append(p)
    except OSError:
        pass
    finally:
        s.close()
if len(got) < n:
    raise SystemExit("no free port")
print(" ".join(map(str, got)))
EOF
}

. "$ROOT/bench/lib.sh"

# ---------------------------------------------------------------- setup
ensure_packages
command -v python3 >/dev/null || { log "python3 is needed"; exit 1; }
RV=$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')
[ "${RV:-0}" -ge 7 ] || { log "Redis 7 or later is needed for sharded pub/sub (have: $(redis-server --version))"; exit 1; }

cd "$ROOT"
TD=${CARGO_TARGET_DIR:-$ROOT/target}
if [ ! -f "$TD/release/libngx_http_websocket_chat_module.so" ] || [ ! -x "$TD/release/nginx" ]; then
    log "the module is not built ($TD/release/nginx, libngx_http_websocket_chat_module.so): run cargo build --release first"
    exit 1
fi
if [ ! -x "$TD/release/wschat-bench" ]; then
    log "cargo build --release -p wschat-bench"
    cargo build --release -p wschat-bench >&2
fi

WORK=$(mktemp -d /tmp/wschat-cluster.XXXXXX)
REDIS_PIDS=()   # every redis-server started here
MASTER_PID=""
SAMPLER_PID=""
cleanup() {
    [ -n "$SAMPLER_PID" ] && stop_pid "$SAMPLER_PID" 5 TERM
    [ -n "$MASTER_PID" ] && stop_pid "$MASTER_PID" 10 QUIT
    local p
    for p in "${REDIS_PIDS[@]}"; do stop_pid "$p" 10 TERM; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Snapshot the binaries: another build may replace them while this runs.
cp -L "$TD/release/nginx" "$WORK/nginx"
cp "$TD/release/libngx_http_websocket_chat_module.so" "$WORK/module.so"
cp "$TD/release/wschat-bench" "$WORK/wschat-bench"
MODULE_SHA=$(sha256sum "$WORK/module.so" | cut -c1-16)
BENCH_SHA=$(sha256sum "$WORK/wschat-bench" | cut -c1-16)
SRC_ADDRS=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4

# A small Redis client (RESP over a socket), the cluster readiness check, the
# room -> slot -> shard map, and the sampler that runs beside each measurement.
cat > "$WORK/rhelp.py" <<'PYEOF'
import json, os, signal, socket, sys, time

class R:
    def __init__(self, port, timeout=5.0):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.s.makefile("rb")
    def cmd(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.s.sendall(b"".join(out))
        return self.read()
    def read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("redis closed the connection")
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError("bad reply %r" % line)
    def close(self):
        try:
            self.s.close()
        except Exception:
            pass

def info(r, section):
    d = {}
    for l in r.cmd("INFO", section).splitlines():
        if ":" in l and not l.startswith("#"):
            k, v = l.split(":", 1)
            d[k] = v
    return d

def slot_map(port):
    r = R(port)
    try:
        return sorted((s[0], s[1], int(s[2][1])) for s in r.cmd("CLUSTER", "SLOTS"))
    finally:
        r.close()

def wait_cluster(ports, secs):
    deadline = time.time() + secs
    why = "?"
    while time.time() < deadline:
        try:
            maps = []
            for p in ports:
                r = R(p)
                st = r.cmd("CLUSTER", "INFO")
                r.close()
                if "cluster_state:ok" not in st:
                    raise RuntimeError(f"{p}: cluster_state not ok")
                maps.append(slot_map(p))
            if any(m != maps[0] for m in maps):
                raise RuntimeError("nodes disagree on the slot map")
            if sum(b - a + 1 for a, b, _ in maps[0]) != 16384:
                raise RuntimeError("not all slots covered")
            if sorted({o for _, _, o in maps[0]}) != sorted(ports):
                raise RuntimeError("not every node owns slots")
            return 0
        except Exception as e:
            why = str(e)
        time.sleep(0.2)
    print(f"cluster not ready after {secs}s: {why}", file=sys.stderr)
    return 1

def rooms(prefix, n, ports, chan_prefix="wschat:"):
    m = slot_map(ports[0])
    r = R(ports[0])
    out = {"slots": [[a, b, o] for a, b, o in m], "rooms": {}, "per_port": {str(p): [] for p in ports}}
    for i in range(n):
        room = f"{prefix}{i}"
        key = f"{chan_prefix}{{{room}}}"
        slot = r.cmd("CLUSTER", "KEYSLOT", key)
        owner = next(o for a, b, o in m if a <= slot <= b)
        out["rooms"][room] = {"key": key, "slot": slot, "port": owner}
        out["per_port"][str(owner)].append(room)
    r.close()
    print(json.dumps(out))
    return 0

def flush(ports):
    for p in ports:
        r = R(p)
        r.cmd("FLUSHALL")
        r.cmd("CONFIG", "RESETSTAT")
        r.close()
    return 0

def ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])   # utime + stime (fields 14, 15)

def client_list(r, own_id):
    n, cmds = 0, {}
    for l in r.cmd("CLIENT", "LIST").splitlines():
        kv = dict(x.split("=", 1) for x in l.split(" ") if "=" in x)
        if kv.get("id") == str(own_id):
            continue
        n += 1
        c = kv.get("cmd", "?")
        cmds[c] = cmds.get(c, 0) + 1
    return n, cmds

def sample(out_path, stop_path, max_s, ports, pids, thresh):
    """Every 0.1 s: utime+stime of each Redis pid (and, until publishing has
    begun, the nodes' total_commands_processed); every 1 s: CLIENT LIST per
    node (not counting this sampler's own connection). Until stop_path exists
    (at most max_s)."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    conns = [R(p) for p in ports]
    own = [c.cmd("CLIENT", "ID") for c in conns]
    for c in conns:
        c.cmd("CLIENT", "SETNAME", "cluster-sh-sampler")
    hz = os.sysconf("SC_CLK_TCK")
    samples, clients = [], []
    t0 = time.time()
    next_cl = t0
    last_cmds, last_t, first_pub = None, None, None
    while not stop and not os.path.exists(stop_path) and time.time() - t0 < max_s:
        t = time.time()
        try:
            tk = [ticks(p) for p in pids]
        except OSError:
            tk = None
        samples.append([t, tk])
        if first_pub is None:
            # total_commands_processed of all nodes, until it jumps by a
            # quarter of the publishers' 0.1 s share: publishing has begun
            # between the previous sample and this one.
            try:
                n = sum(int(info(c, "stats").get("total_commands_processed", 0)) for c in conns)
            except Exception:
                n = None
            if n is not None and last_cmds is not None and n - last_cmds >= thresh:
                first_pub = (last_t + t) / 2
            last_cmds, last_t = n, t
        if t >= next_cl:
            row = []
            for c, i in zip(conns, own):
                try:
                    row.append(client_list(c, i))
                except Exception:
                    row.append((None, {}))
            clients.append([t, [x[0] for x in row], [x[1] for x in row]])
            next_cl = t + 1.0
        time.sleep(max(0.0, 0.1 - (time.time() - t)))
    with open(out_path, "w") as f:
        json.dump({"hz": hz, "ports": ports, "pids": pids, "first_publish": first_pub,
                   "sampler_cpu_s": round(time.process_time(), 3), "sampler_wall_s": round(time.time() - t0, 3),
                   "samples": samples, "clients": clients}, f)
    return 0

def commandstats(ports):
    out = {}
    for p in ports:
        r = R(p)
        d = {}
        for k, v in info(r, "commandstats").items():
            if k.startswith("cmdstat_"):
                calls = dict(x.split("=", 1) for x in v.split(","))
                d[k[8:]] = int(calls.get("calls", 0))
        r.close()
        out[str(p)] = d
    print(json.dumps(out))
    return 0

if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "wait-cluster":
        sys.exit(wait_cluster([int(x) for x in a[2:]], float(a[1])))
    if a[0] == "rooms":
        sys.exit(rooms(a[1], int(a[2]), [int(x) for x in a[3:]]))
    if a[0] == "flush":
        sys.exit(flush([int(x) for x in a[1:]]))
    if a[0] == "commandstats":
        sys.exit(commandstats([int(x) for x in a[1:]]))
    if a[0] == "sample":
        ports = [int(x) for x in a[4].split(",")]
        pids = [int(x) for x in a[5].split(",")]
        sys.exit(sample(a[1], a[2], float(a[3]), ports, pids, float(a[6])))
    sys.exit("rhelp.py: unknown command")
PYEOF
RH() { python3 "$WORK/rhelp.py" "$@"; }

read -r P_SINGLE P1 P2 P3 B1 B2 B3 <<< "$(free_ports 7)"
CLUSTER_PORTS=("$P1" "$P2" "$P3")
BUS_PORTS=("$B1" "$B2" "$B3")

start_redis() { # name port [args...]: daemonized, private dir, no persistence
    local name=$1 port=$2 d="$WORK/$1"
    shift 2
    mkdir -p "$d"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log" \
        --dir "$d" --maxclients 10000 "$@" >/dev/null
    wait_tcp 127.0.0.1 "$port" 10 || { log "redis $name did not start"; cat "$d/redis.log" >&2; exit 1; }
    local i
    for ((i = 0; i < 50; i++)); do [ -s "$d/redis.pid" ] && break; sleep 0.1; done
    REDIS_PIDS+=("$(cat "$d/redis.pid")")
}

start_redis single "$P_SINGLE"
SINGLE_PID=${REDIS_PIDS[0]}
CLUSTER_PIDS=()
for i in 0 1 2; do
    start_redis "node$((i + 1))" "${CLUSTER_PORTS[$i]}" --cluster-enabled yes \
        --cluster-config-file nodes.conf --cluster-port "${BUS_PORTS[$i]}" \
        --cluster-node-timeout 5000
    CLUSTER_PIDS+=("${REDIS_PIDS[-1]}")
done
log "single Redis 127.0.0.1:$P_SINGLE (pid $SINGLE_PID); cluster nodes ${CLUSTER_PORTS[*]} (pids ${CLUSTER_PIDS[*]}, bus ${BUS_PORTS[*]})"
timeout 60 redis-cli --cluster create "127.0.0.1:$P1" "127.0.0.1:$P2" "127.0.0.1:$P3" \
    --cluster-replicas 0 --cluster-yes > "$WORK/cluster-create.log" 2>&1 \
    || { log "redis-cli --cluster create failed"; cat "$WORK/cluster-create.log" >&2; exit 1; }
RH wait-cluster 30 "$P1" "$P2" "$P3" || { cat "$WORK/cluster-create.log" >&2; exit 1; }
RH rooms "$ROOM_PREFIX" "$ROOMS" "$P1" "$P2" "$P3" > "$WORK/rooms.json"
log "cluster ready; rooms per shard: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(", ".join(f"{p}: {len(r)}" for p, r in d["per_port"].items()))' "$WORK/rooms.json")"

STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RAW="$WORK/raw"
mkdir -p "$RAW"
ANOMALIES="$RAW/anomalies.txt"
: > "$ANOMALIES"
cp "$WORK/rooms.json" "$RAW/rooms.json"

# ---------------------------------------------------------------- nginx
write_conf() { # dir port redis-line-argument
    local d=$1 port=$2 redis=$3
    mkdir -p "$d/logs" "$d/conf"
    cat > "$d/conf/nginx.conf" <<EOF
load_module $WORK/module.so;
worker_processes 2;
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
    websocket_chat_redis $redis;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /ws {
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_user \$arg_nick;
            websocket_chat_presence $PRESENCE;
        }
    }
}
EOF
}

NGINX_DIR=""
URL=""
start_nginx() { # name redis-line-argument
    local port
    NGINX_DIR="$WORK/nginx-$1"
    rm -rf "$NGINX_DIR"
    port=$(free_ports 1)
    write_conf "$NGINX_DIR" "$port" "$2"
    URL="ws://127.0.0.1:$port/ws"
    "$WORK/nginx" -p "$NGINX_DIR" -c "$NGINX_DIR/conf/nginx.conf" -e "$NGINX_DIR/logs/error.log" -t -q \
        || { log "nginx -t failed"; exit 1; }
    "$WORK/nginx" -p "$NGINX_DIR" -c "$NGINX_DIR/conf/nginx.conf" -e "$NGINX_DIR/logs/error.log"
    wait_tcp 127.0.0.1 "$port" 10 || { log "nginx did not start"; cat "$NGINX_DIR/logs/error.log" >&2; exit 1; }
    local i
    for ((i = 0; i < 100; i++)); do [ -s "$NGINX_DIR/logs/nginx.pid" ] && break; sleep 0.1; done
    MASTER_PID=$(cat "$NGINX_DIR/logs/nginx.pid" 2>/dev/null || true)
    if [ -z "$MASTER_PID" ] || ! kill -0 "$MASTER_PID" 2>/dev/null; then
        log "no nginx master pid"; cat "$NGINX_DIR/logs/error.log" >&2; exit 1
    fi
    for ((i = 0; i < 50; i++)); do
        [ "$(pgrep -P "$MASTER_PID" | wc -l)" -ge 2 ] && break
        sleep 0.1
    done
    sleep 1
}

stop_nginx() {
    stop_pid "$MASTER_PID" 15 QUIT
    MASTER_PID=""
}

# ---------------------------------------------------------------- one measurement
measure() { # target run
    local t=$1 n=$2 tag="$1-$2" ports pids redis_line workers rc=0
    if [ "$t" = single ]; then
        ports=$P_SINGLE; pids=$SINGLE_PID; redis_line="127.0.0.1:$P_SINGLE"
    else
        ports="$P1,$P2,$P3"; pids=$(IFS=,; echo "${CLUSTER_PIDS[*]}")
        redis_line="cluster=127.0.0.1:$P1,127.0.0.1:$P2,127.0.0.1:$P3"
    fi
    log "=== run $n: $t ($ROOMS rooms x $MEMBERS members, $PUBLISHERS publishers, $RATE msg/s, ${DURATION}s window)"
    RH flush ${ports//,/ }
    wait_quiet "$tag"
    start_nginx "$tag" "$redis_line"
    workers=$(workers_of "$MASTER_PID")
    log "$t: nginx master $MASTER_PID, workers $workers, $URL"
    rm -f "$RAW/$tag.stop"
    RH sample "$RAW/$tag-samples.json" "$RAW/$tag.stop" $((DURATION + 200)) "$ports" "$pids" "$THRESH" &
    SAMPLER_PID=$!
    local t_start t_end
    t_start=$(date +%s.%N)
    timeout $((DURATION + 180)) "$WORK/wschat-bench" --url "$URL" --server-pids "$workers" \
        --redis-pid "$pids" --label "$t/$n" --json \
        --clients "$CLIENTS" --rooms "$ROOMS" --publishers "$PUBLISHERS" --rate "$RATE" \
        --duration "$DURATION" --warmup "$WARMUP" --drain "$DRAIN" --procs 2 \
        --source-addrs "$SRC_ADDRS" --room-prefix "$ROOM_PREFIX" \
        > "$RAW/$tag.json" 2> "$RAW/$tag.log" || rc=$?
    t_end=$(date +%s.%N)
    touch "$RAW/$tag.stop"
    wait "$SAMPLER_PID" || echo "$tag: the sampler exited non-zero" >> "$ANOMALIES"
    SAMPLER_PID=""
    printf '{"start": %s, "end": %s, "warmup": %s, "duration": %s, "drain": %s, "rc": %s}\n' \
        "$t_start" "$t_end" "$WARMUP" "$DURATION" "$DRAIN" "$rc" > "$RAW/$tag-times.json"
    RH commandstats ${ports//,/ } > "$RAW/$tag-commandstats.json" || true
    sed 's/^/    /' "$RAW/$tag.log" >&2
    [ "$rc" = 0 ] || echo "$tag: wschat-bench exited $rc" >> "$ANOMALIES"
    [ "$workers" = "$(workers_of "$MASTER_PID")" ] \
        || echo "$tag: worker pids changed during the run: a worker died" >> "$ANOMALIES"
    stop_nginx
    cp "$NGINX_DIR/logs/error.log" "$RAW/$tag-error.log" 2>/dev/null || true
    local errs
    errs=$(grep -cE '\[(alert|crit|emerg|error)\]|exited on signal|segfault' "$RAW/$tag-error.log" 2>/dev/null || true)
    if [ "${errs:-0}" != 0 ]; then
        echo "$tag: $errs error/alert/crit/emerg lines in the nginx error log, e.g.:" >> "$ANOMALIES"
        grep -E '\[(alert|crit|emerg|error)\]|exited on signal|segfault' "$RAW/$tag-error.log" | head -3 | sed 's/^/    /' >> "$ANOMALIES"
    fi
    sleep $((QUICK ? 1 : 2)) # let closed connections go before the next run
}

# Commands in 0.1 s that tell the publishers have started: a quarter of theirs.
THRESH=$(( RATE / 40 > 20 ? RATE / 40 : 20 ))

T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((n = 1; n <= RUNS; n++)); do
    measure single "$n"
    measure cluster "$n"
done
ELAPSED=$(( $(date +%s) - T0 ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
MD="$OUT/cluster-$STAMP.md"
JS="$OUT/cluster-$STAMP.json"
REDIS_VERSION=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
export RUNS QUICK ELAPSED ORIG_ARGS LOAD_START LOAD_END MODULE_SHA BENCH_SHA ROOMS MEMBERS \
    PUBLISHERS RATE DURATION PRESENCE P_SINGLE P1 P2 P3 REDIS_VERSION
python3 - "$RAW" "$MD" "$JS" <<'PYEOF'
import glob, json, os, platform, sys
raw, md_path, js_path = sys.argv[1:4]
E = os.environ
RUNS, QUICK, ELAPSED = int(E["RUNS"]), E["QUICK"] == "1", int(E["ELAPSED"])
CMD = ("bash bench/cluster.sh " + E["ORIG_ARGS"]).strip()
LOAD0, LOAD1 = E["LOAD_START"], E["LOAD_END"]
SHA, BSHA = E["MODULE_SHA"], E["BENCH_SHA"]
ROOMS, MEMBERS, PUBS, RATE, DUR = (int(E[k]) for k in ("ROOMS", "MEMBERS", "PUBLISHERS", "RATE", "DURATION"))
PRESENCE = E["PRESENCE"]
SINGLE_PORT, CLUSTER_PORTS = int(E["P_SINGLE"]), [int(E[k]) for k in ("P1", "P2", "P3")]
REDIS_RV = E["REDIS_VERSION"]

def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:
        return None

def g(r, *path):
    for k in path:
        if not isinstance(r, dict):
            return None
        r = r.get(k)
    return r

rooms = load(os.path.join(raw, "rooms.json")) or {}
anom = open(os.path.join(raw, "anomalies.txt")).read().strip()

def window_cpu(samples, times):
    """Per-process Redis CPU (% of one core) over the measured window, from
    the sampler's /proc/<pid>/stat readings (interpolated between samples).
    The window starts warmup s after the publishers' first commands reached
    Redis (as the sampler saw the nodes' command counters jump) and lasts
    duration s; if no jump was seen, it ends drain s before wschat-bench
    exited."""
    S = [s for s in samples["samples"] if s[1] is not None]
    hz = samples["hz"]
    if len(S) < 3:
        return None, None, "few samples"
    if samples.get("first_publish"):
        start = samples["first_publish"] + times["warmup"]
        how = "from the first publishes"
    else:
        start = times["end"] - times["drain"] - times["duration"]
        how = "from wschat-bench's exit"
    end = start + times["duration"]
    def at(t):
        # linear interpolation of each pid's ticks at time t
        for j in range(1, len(S)):
            if S[j][0] >= t:
                a, b = S[j - 1], S[j]
                f = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0
                return [x + (y - x) * f for x, y in zip(a[1], b[1])]
        return S[-1][1]
    ta, tb = at(start), at(end)
    pct = [round((y - x) / hz / (end - start) * 100, 2) for x, y in zip(ta, tb)]
    return pct, (start, end), how

def clients_during(samples, window):
    """Connections per node (CLIENT LIST, without the sampler's own): the
    highest count seen during the window, and the commands they last ran."""
    C = samples["clients"]
    inside = [c for c in C if window and window[0] <= c[0] <= window[1]] or C
    if not inside:
        return None, None
    best = max(inside, key=lambda c: sum(x or 0 for x in c[1]))
    return best[1], best[2]

runs = []
for n in range(1, RUNS + 1):
    for t in ("single", "cluster"):
        tag = f"{t}-{n}"
        r = load(os.path.join(raw, f"{tag}.json"))
        times = load(os.path.join(raw, f"{tag}-times.json")) or {}
        samples = load(os.path.join(raw, f"{tag}-samples.json"))
        cstats = load(os.path.join(raw, f"{tag}-commandstats.json"))
        pct, win, how = (None, None, "no samples")
        conns, conn_cmds = None, None
        if samples and times:
            pct, win, how = window_cpu(samples, times)
            conns, conn_cmds = clients_during(samples, win)
        runs.append({"target": t, "run": n, "report": r, "times": times,
                     "redis_cpu_pct_per_process": pct, "redis_window": win, "redis_window_from": how,
                     "redis_ports": samples["ports"] if samples else None,
                     "sampler_cpu_pct": (round(samples["sampler_cpu_s"] / samples["sampler_wall_s"] * 100, 2)
                                         if samples and samples.get("sampler_wall_s") else None),
                     "redis_connections": conns, "redis_connection_last_cmds": conn_cmds,
                     "commandstats": cstats})

def f(v, d=2):
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{d}f}"

def row(x):
    r = x["report"]
    lost = g(r, "deliveries", "lost")
    ratio = g(r, "deliveries", "loss_ratio")
    per = x["redis_cpu_pct_per_process"]
    conns = x["redis_connections"]
    return [f"{x['target']} #{x['run']}",
            f(g(r, "deliveries", "rate_per_s"), 0),
            (f"{f(lost)} ({ratio * 100:.3f}%)" if lost is not None and ratio is not None else "n/a"),
            f(g(r, "latency_ms", "p50")), f(g(r, "latency_ms", "p99")),
            f(g(r, "cpu", "server_pct"), 1),
            f(g(r, "cpu", "redis_pct"), 1),
            " / ".join(f(v, 1) for v in per) if per else "n/a",
            " / ".join(str(v) for v in conns) if conns else "n/a",
            f(g(r, "cpu", "others_pct"), 1)]

hdr = ["run", "deliveries/s", "lost (ratio)", "p50 ms", "p99 ms", "worker CPU %",
       "Redis CPU % (total)", "Redis CPU % per process", "Redis connections", "others' CPU %"]
out = []
out.append(f"# websocket_chat: one Redis vs a 3-shard Redis Cluster ({'quick' if QUICK else 'full'} run)\n")
out.append(f"Command: `{CMD}`. Machine: {os.cpu_count()} cores, Linux {platform.release()}; load average {LOAD0} at the start, {LOAD1} at the end. Elapsed {ELAPSED}s. Redis {REDIS_RV}.\n")
out.append(f"Load: {ROOMS} rooms x {MEMBERS} members ({ROOMS * MEMBERS:,} connections), {PUBS} publishers, {RATE:,} msg/s in all, {DUR}s measured window, 2 client processes + 1 for the publishers; nginx with the module (.so sha256 {SHA}…; wschat-bench {BSHA}…), 2 workers, `websocket_chat_presence {PRESENCE}`, history at its default; the two nginx configs differ only in `websocket_chat_redis` (`127.0.0.1:{SINGLE_PORT}` vs `cluster=` the 3 primaries). Runs alternate single, cluster, single, cluster; Redis is flushed before each.\n")
pp = rooms.get("per_port", {})
slots = {str(o): f"{a}-{b}" for a, b, o in rooms.get("slots", [])}
out.append("Rooms per shard (CLUSTER KEYSLOT wschat:{room}): " + ", ".join(
    f"node {i + 1} (:{p}, slots {slots.get(p, '?')}): {len(pp.get(p, []))}" for i, p in enumerate(pp)) + ".\n")
out.append("| " + " | ".join(hdr) + " |")
out.append("|" + "---|" * len(hdr))
for x in runs:
    out.append("| " + " | ".join(row(x)) + " |")
out.append("")
# means over the runs of each target
def mean(t, *path):
    v = [g(x["report"], *path) for x in runs if x["target"] == t]
    v = [a for a in v if isinstance(a, (int, float))]
    return sum(v) / len(v) if v else None
if RUNS > 1:
    out.append("| mean of the runs | single | cluster | cluster / single |")
    out.append("|---|---|---|---|")
    for label, path in [("deliveries/s", ("deliveries", "rate_per_s")), ("lost", ("deliveries", "lost")),
                        ("p50 ms", ("latency_ms", "p50")), ("p99 ms", ("latency_ms", "p99")),
                        ("p99.9 ms", ("latency_ms", "p999")),
                        ("worker CPU %", ("cpu", "server_pct")), ("Redis CPU % (total)", ("cpu", "redis_pct")),
                        ("others' CPU %", ("cpu", "others_pct"))]:
        a, b = mean("single", *path), mean("cluster", *path)
        ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "n/a"
        out.append(f"| {label} | {f(a)} | {f(b)} | {ratio} |")
    out.append("")
sp = [x["sampler_cpu_pct"] for x in runs if x.get("sampler_cpu_pct") is not None]
sp = f"{max(sp):.1f}" if sp else "n/a"
out.append(f"Columns: deliveries/s = messages received by members in the window / window (every member, publishers included, should get every message of its room); lost = expected − received unique; p50/p99 = receive time − scheduled send time (open loop; the client shares the 2 cores); worker CPU = both nginx workers, % of one core, over the window (wschat-bench's `cpu.server_pct`); Redis CPU total = wschat-bench's `cpu.redis_pct` (all the target's redis-server processes, exact window); Redis CPU per process = utime+stime from /proc/<pid>/stat sampled every 0.1 s by this script, over the window placed from the first publishes Redis counted + warmup (for the cluster: node 1 / node 2 / node 3); Redis connections = CLIENT LIST on each node during the window, the sampler's own connection not counted (for the cluster: per node); others = CPU of everything else on the machine (noise), including the idle Redis of the other target and this script's sampler ({sp}% of one core).\n")
# connections detail, commands per shard
out.append("## Per-node detail\n")
out.append("| run | node | rooms | connections (last command: count) | commands in the run (calls) |")
out.append("|---|---|---|---|---|")
for x in runs:
    ports = x["redis_ports"] or []
    for i, p in enumerate(ports):
        nrooms = ROOMS if x["target"] == "single" else len(pp.get(str(p), []))
        cmds = (x["redis_connection_last_cmds"] or [{}] * len(ports))[i]
        conns = (x["redis_connections"] or [None] * len(ports))[i]
        cs = (x["commandstats"] or {}).get(str(p), {})
        top = ", ".join(f"{k} {v:,}" for k, v in sorted(cs.items(), key=lambda kv: -kv[1])[:4]
                        if k not in ("info", "client|list", "client|id", "client|setname", "flushall", "config|resetstat"))
        out.append(f"| {x['target']} #{x['run']} | {'single' if x['target'] == 'single' else f'node {i + 1}'} :{p} | {nrooms} | {conns} ({', '.join(f'{k}: {v}' for k, v in sorted(cmds.items()))}) | {top} |")
out.append("")
errs = []
for x in runs:
    r = x["report"]
    tag = f"{x['target']} #{x['run']}"
    if r is None:
        errs.append(f"- {tag}: no report")
        continue
    if (g(r, "error_count") or 0) > 0:
        errs.append(f"- {tag}: {g(r, 'error_count')} client-side errors, e.g. {'; '.join(str(e) for e in (g(r, 'errors') or [])[:3])}")
    for k in ("disconnects", "duplicated", "out_of_order", "misrouted", "server_error_events"):
        if (g(r, "deliveries", k) or 0) > 0:
            errs.append(f"- {tag}: deliveries.{k} = {g(r, 'deliveries', k)}")
    if (g(r, "connections", "failed") or 0) > 0:
        errs.append(f"- {tag}: {g(r, 'connections', 'failed')} connections failed")
    if x["redis_window_from"] != "from the first publishes":
        errs.append(f"- {tag}: Redis per-process CPU window placed {x['redis_window_from']}")
out.append("## Anomalies\n")
out.append("\n".join(filter(None, [anom, "\n".join(errs)])) or "none seen")
out.append("")
md = "\n".join(out)
open(md_path, "w").write(md)
json.dump({"command": CMD, "quick": QUICK, "module_sha256_prefix": SHA, "bench_sha256_prefix": BSHA,
           "load": {"rooms": ROOMS, "members": MEMBERS, "publishers": PUBS, "rate": RATE, "duration_s": DUR,
                    "presence": PRESENCE},
           "redis": {"single_port": SINGLE_PORT, "cluster_ports": CLUSTER_PORTS, "version": REDIS_RV},
           "rooms": rooms, "elapsed_s": ELAPSED, "runs": runs, "anomalies": anom},
          open(js_path, "w"), indent=1)
print(md)
PYEOF
log "results: $MD, $JS"
