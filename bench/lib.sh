# Shell helpers shared by the benchmark scripts (sourced). They expect a
# `log` function and, for wait_quiet, ANOMALIES (a file) to be defined.

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

# Wait up to QUIET_MAX seconds (default 60) for the machine to be quiet
# (under 25% of a core busy over one second), so that a build or test
# running beside us spoils fewer numbers; $1 names the measurement.
wait_quiet() {
    local i a b
    for ((i = 0; i < ${QUIET_MAX:-60}; i++)); do
        a=$(busy_ticks); sleep 1; b=$(busy_ticks)
        [ $((b - a)) -lt 25 ] && return 0
    done
    log "the machine is still busy with other processes; measuring anyway"
    echo "$1: started while other processes kept the machine busy (see 'others' CPU)" >> "$ANOMALIES"
}
