# shellcheck shell=bash
# Shared by the scripts in benches/ (sourced, not run): a temp dir whose processes are
# stopped on exit, free loopback ports, waiting for a server, the release build, and
# the results table.
#
# The sourcing script sets NAME (for messages) and KEEP (1 keeps the temp dir) first.
# After sourcing: $WORK is the temp dir, PIDS the processes stopped on exit.

: "${NAME:?set NAME before sourcing benches/lib.sh}"
KEEP=${KEEP:-0}

log() {
    printf '[%s] %s\n' "$(date +%T)" "$*" >&2
}

die() {
    printf '%s: %s\n' "$NAME" "$*" >&2
    exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/outpost-$NAME.XXXXXX")
PIDS=()

# stop_pid PID: SIGTERM, up to 10 s, then SIGKILL.
# shellcheck disable=SC2317 # invoked by cleanup (the EXIT trap)
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    if [[ $KEEP == 1 ]]; then
        echo "$NAME: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port: a loopback port nothing listens on, below the ephemeral range.
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
if ((EPHEMERAL_LOW < 12000)); then EPHEMERAL_LOW=32768; fi
free_port() {
    local port
    while :; do
        port=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# start_bg NAME CMD…: CMD in the background, output in $WORK/NAME.out and .err; its pid
# in $BG_PID and PIDS.
start_bg() {
    local name=$1
    shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

# wait_http URL PID NAME: until URL answers (any status), at most 30 s, failing early if
# PID died (its $WORK/NAME.err is shown).
wait_http() {
    local url=$1 pid=$2 name=$3 i
    for ((i = 0; i < 300; i++)); do
        if curl -so /dev/null --max-time 2 "$url"; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || {
            tail -n 20 "$WORK/$name.err" >&2 2>/dev/null || true
            die "$name exited during start-up"
        }
        sleep 0.1
    done
    die "$name did not answer $url within 30 s"
}

# build_outpost: $OUTPOST_BIN, or a release build of this checkout (not timed).
build_outpost() {
    if [[ -z ${OUTPOST_BIN:-} ]]; then
        OUTPOST_BIN="${CARGO_TARGET_DIR:-target}/release/outpost"
        command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH (or set OUTPOST_BIN)"
        log "cargo build --release --locked (not timed)"
        cargo build --release --locked --quiet
    fi
    [[ -x $OUTPOST_BIN ]] || die "no executable at $OUTPOST_BIN"
    OUTPOST_BIN=$(realpath "$OUTPOST_BIN")
}

# ratio A B: A / B as `1.23x`, or `-` when B is 0.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2fx", a / b }'
}

# check AWK-CONDITION: sets OK to "yes", or to "NO" and counts a missed target in MISSED.
MISSED=0
# shellcheck disable=SC2034 # OK is read by the sourcing script's row calls
check() {
    if awk "BEGIN { exit !($1) }"; then
        OK=yes
    else
        OK=NO
        MISSED=$((MISSED + 1))
    fi
}

# row CELL…: one row (six cells) of the results table; print_table prints them aligned,
# the first as the header.
ROWS=()
row() {
    ROWS+=("$(printf '%s\t%s\t%s\t%s\t%s\t%s' "$@")")
}

print_table() {
    printf '%s\n' "${ROWS[@]}" | awk -F'\t' '
        { for (i = 1; i <= NF; i++) { cell[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } n = NR }
        END {
            for (r = 1; r <= n; r++) {
                line = ""
                for (i = 1; i <= 6; i++) line = line sprintf(i == 1 ? "%-*s" : " | %-*s", w[i], cell[r, i])
                print line
                if (r == 1) {
                    sep = ""
                    for (i = 1; i <= 6; i++) { d = ""; for (k = 0; k < w[i]; k++) d = d "-"; sep = sep (i == 1 ? d : "-|-" d) }
                    print sep
                }
            }
        }'
}
