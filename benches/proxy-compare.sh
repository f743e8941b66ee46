#!/usr/bin/env bash
# Outpost vs distribution's proxy mode, side by side, in one run, against one upstream.
#
# What it measures (every process on 127.0.0.1, data in a temp dir, all stopped on exit):
#   1. Blob GETs: the time of the first (cold) GET through each proxy, against the same
#      GET straight from the upstream. Then warm throughput: after the warming GET, GET_RUNS
#      sequential curl downloads of the big layer blob; the median in MB/s (10^6 bytes/s).
#      nginx serving the same file is the ceiling, if nginx is installed. Also the CPU
#      time each proxy spent per GET (from /proc/PID/stat), steadier on a busy machine.
#   2. Manifests by tag, under load from CONNECTIONS connections for LOAD_SECONDS each:
#      HEAD with ab (wrk 4.1 cannot finish a HEAD response that has a Content-Length),
#      then GET with wrk; requests/s, p99 latency, errors, and how many requests the
#      upstream received meanwhile (a fresh tag should cost a caching proxy none), and
#      the proxy's CPU time per request.
#   3. Cold pull: fresh storage for both proxies, then `skopeo copy docker://… dir:…` of
#      the test image straight from the upstream and through each proxy; the median
#      wall time over COLD_RUNS rounds (each round restarts both proxies on empty storage).
#   4. Coalescing: fresh storage, CONCURRENT simultaneous cold GETs of the big blob through
#      each proxy; upstream GETs of that blob, and every client's sha256 checked.
#   5. Memory: RSS (VmRSS) of each proxy right after start, and its peak (VmHWM) over
#      the whole run (the highest over the instances each proxy ran as).
#
# The setup: an upstream `docker-registry` (distribution, plain HTTP, filesystem storage,
# access log on, so its requests can be counted) holding `library/bench:latest`, one
# LAYER_MIB MiB layer of random bytes wrapped in a stored (uncompressed) gzip stream plus
# a small config, pushed with curl through the registry API so nothing is recompressed.
# Then a second `docker-registry` with `proxy.remoteurl` pointing at it, and Outpost with
# one `[[upstream]] name = "docker.io"` pointing at it. Outpost is asked for
# `/v2/docker.io/library/bench/…`, distribution for `/v2/library/bench/…`.
#
# Run from the repository root:   benches/proxy-compare.sh
# Needs: docker-registry, skopeo, curl, ab, wrk, sha256sum, and python3 or gzip; nginx is
# optional, and openssl (if present) hashes downloads faster than sha256sum
# (Debian: apt-get install -y docker-registry skopeo apache2-utils wrk nginx-light).
# It runs `cargo build --release --locked` first (build time is not part of any figure);
# a full run takes about 100 s on 2 cores, plus the build, and needs ~1.5 GiB of
# free space in TMPDIR. Not part of CI or scripts/test: figures depend on the machine.
#
# Knobs (environment): LAYER_MIB=256 GET_RUNS=5 COLD_RUNS=3 LOAD_SECONDS=10 CONNECTIONS=32
# WRK_THREADS=2 CONCURRENT=32 NGINX=auto|off OUTPOST_BIN=path (skip the build)
# KEEP=1 (keep the temp dir and logs) STRICT=1 (exit 1 when a target is missed).
# Exit status: non-zero when something is wrong (a process does not start, a download
# has the wrong digest, a tool fails), and with STRICT=1 when a target is missed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

LAYER_MIB=${LAYER_MIB:-256}
GET_RUNS=${GET_RUNS:-5}
COLD_RUNS=${COLD_RUNS:-3}
LOAD_SECONDS=${LOAD_SECONDS:-10}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-2}
CONCURRENT=${CONCURRENT:-32}
NGINX=${NGINX:-auto}
KEEP=${KEEP:-0}
STRICT=${STRICT:-0}

REPO=library/bench
TAG=latest
ACCEPT='application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'

NAME="proxy-compare"
# shellcheck source=benches/lib.sh
source benches/lib.sh

missing=()
for tool in docker-registry skopeo curl ab wrk sha256sum awk; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ! command -v python3 >/dev/null 2>&1 && ! command -v gzip >/dev/null 2>&1; then
    missing+=("python3 or gzip")
fi
if ((${#missing[@]} > 0)); then
    die "not on PATH: ${missing[*]} (Debian: apt-get install -y docker-registry skopeo apache2-utils wrk curl)"
fi

forget_pid() {
    local pid=$1 kept=() p
    for p in "${PIDS[@]}"; do
        [[ $p == "$pid" ]] || kept+=("$p")
    done
    PIDS=("${kept[@]}")
}

# run_waiting OUT CMD…: runs CMD with its output in OUT, in the background, and waits for
# it: a signal then reaches the traps at once instead of after CMD ends (bash defers traps
# while a foreground command runs). Returns CMD's status.
run_waiting() {
    local out=$1 pid status=0
    shift
    "$@" >"$out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || status=$?
    forget_pid "$pid"
    return "$status"
}

# proc_kib PID FIELD: VmRSS or VmHWM in KiB.
proc_kib() {
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

# sha256_hex: the hex sha256 of stdin. openssl's is several times faster than
# coreutils', which matters when dozens of clients check 256 MiB each.
if command -v openssl >/dev/null 2>&1; then
    sha256_hex() {
        openssl dgst -sha256 -r | cut -d' ' -f1
    }
else
    sha256_hex() {
        sha256sum | cut -d' ' -f1
    }
fi

# cpu_ticks PID: user + system CPU time the process has used so far, in clock ticks.
cpu_ticks() {
    sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
CLK_TCK=$(getconf CLK_TCK)

mib() {
    awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'
}

# ---------------------------------------------------------------------------- build
build_outpost

NGINX_BIN=
if [[ $NGINX != off ]]; then
    NGINX_BIN=$(command -v nginx || true)
    if [[ -z $NGINX_BIN && -x /usr/sbin/nginx ]]; then NGINX_BIN=/usr/sbin/nginx; fi
fi

# ---------------------------------------------------------------------------- facts
START_TIME=$SECONDS
version_of() {
    "$@" 2>&1 | head -n 1 || true
}
echo "== Outpost vs distribution proxy: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:         $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/^MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
echo "kernel:          $(uname -srm)"
echo "load average:    $(cut -d' ' -f1-3 /proc/loadavg) (at start)"
echo "outpost:         $(version_of "$OUTPOST_BIN" --version) ($(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+dirty'))"
echo "distribution:    $(version_of docker-registry --version)"
echo "skopeo:          $(version_of skopeo --version)"
echo "curl:            $(version_of curl --version)"
echo "wrk:             $(version_of wrk -v)"
echo "ab:              $(ab -V 2>&1 | sed -n 's/^This is \(.*\), Version \([^ ]*\).*/\1 \2/p' | head -n 1)"
if [[ -n $NGINX_BIN ]]; then
    echo "nginx:           $(version_of "$NGINX_BIN" -v)"
else
    echo "nginx:           not used (not installed, or NGINX=off)"
fi
echo "image:           one ${LAYER_MIB} MiB layer; warm GET runs $GET_RUNS; cold pull rounds $COLD_RUNS; manifest load ${LOAD_SECONDS}s at $CONNECTIONS connections; $CONCURRENT concurrent cold GETs"
echo

# ---------------------------------------------------------------------------- upstream
log "creating the ${LAYER_MIB} MiB layer"
mkdir -p "$WORK/files"
LAYER="$WORK/files/layer"
head -c $((LAYER_MIB * 1024 * 1024)) /dev/urandom >"$WORK/raw"
# A gzip stream of stored blocks: clients see a compressed layer and copy it unchanged.
if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import gzip, sys
data = open(sys.argv[1], "rb").read()
open(sys.argv[2], "wb").write(gzip.compress(data, compresslevel=0, mtime=0))' "$WORK/raw" "$LAYER"
else
    gzip -1 -n -c "$WORK/raw" >"$LAYER"
fi
rm -f "$WORK/raw"
LAYER_SIZE=$(stat -c %s "$LAYER")
LAYER_SHA=$(sha256_hex <"$LAYER")
LAYER_DIGEST="sha256:$LAYER_SHA"
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}' >"$WORK/files/config"
CONFIG_SIZE=$(stat -c %s "$WORK/files/config")
CONFIG_DIGEST="sha256:$(sha256_hex <"$WORK/files/config")"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%d}]}' \
    "$CONFIG_DIGEST" "$CONFIG_SIZE" "$LAYER_DIGEST" "$LAYER_SIZE" >"$WORK/files/manifest"
MANIFEST_DIGEST="sha256:$(sha256_hex <"$WORK/files/manifest")"

# registry_config FILE PORT DATA [PROXY_URL]: a docker-registry config.
registry_config() {
    local file=$1 port=$2 data=$3 proxy=${4:-}
    {
        echo "version: 0.1"
        echo "log:"
        echo "  level: info"
        echo "  formatter: text"
        echo "  accesslog:"
        echo "    disabled: false"
        echo "storage:"
        echo "  filesystem:"
        echo "    rootdirectory: $data"
        echo "  delete:"
        echo "    enabled: true"
        echo "http:"
        echo "  addr: 127.0.0.1:$port"
        echo "  secret: outpost-bench"
        if [[ -n $proxy ]]; then
            echo "proxy:"
            echo "  remoteurl: $proxy"
        fi
    } >"$file"
}

UP_PORT=$(free_port)
UP="http://127.0.0.1:$UP_PORT"
registry_config "$WORK/upstream.yml" "$UP_PORT" "$WORK/upstream-data"
start_bg upstream docker-registry serve "$WORK/upstream.yml"
UP_PID=$BG_PID
wait_http "$UP/v2/" "$UP_PID" upstream
# The access log (stdout) has one line per request: `… "GET /v2/… HTTP/1.1" 200 …`.
UP_LOG="$WORK/upstream.out"

push_blob() {
    local file=$1 digest=$2 location sep
    location=$(curl -fsS -X POST -D - -o /dev/null "$UP/v2/$REPO/blobs/uploads/" |
        awk 'tolower($1) == "location:" { sub(/\r$/, "", $2); print $2 }')
    [[ -n $location ]] || die "upstream gave no upload location"
    if [[ $location != http* ]]; then location="$UP$location"; fi
    sep='?'
    if [[ $location == *\?* ]]; then sep='&'; fi
    curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
        -T "$file" "$location${sep}digest=$digest"
}
log "pushing $REPO:$TAG to the upstream"
push_blob "$LAYER" "$LAYER_DIGEST"
push_blob "$WORK/files/config" "$CONFIG_DIGEST"
curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary @"$WORK/files/manifest" "$UP/v2/$REPO/manifests/$TAG"

# upstream_count PATTERN: how many upstream requests so far match the extended regex.
upstream_count() {
    grep -cE "$1" "$UP_LOG" || true
}

# ---------------------------------------------------------------------------- proxies
OP_PORT=$(free_port)
OP="http://127.0.0.1:$OP_PORT"
OP_BLOB="$OP/v2/docker.io/$REPO/blobs/$LAYER_DIGEST"
OP_MANIFEST="$OP/v2/docker.io/$REPO/manifests/$TAG"
DP_PORT=$(free_port)
while [[ $DP_PORT == "$OP_PORT" ]]; do DP_PORT=$(free_port); done
DP="http://127.0.0.1:$DP_PORT"
DP_BLOB="$DP/v2/$REPO/blobs/$LAYER_DIGEST"
DP_MANIFEST="$DP/v2/$REPO/manifests/$TAG"

OP_PID=
DP_PID=
OP_PEAK=0
DP_PEAK=0
INSTANCE=0

# start_proxies: both proxies with fresh, empty storage.
start_proxies() {
    INSTANCE=$((INSTANCE + 1))
    local dir="$WORK/outpost-$INSTANCE"
    mkdir -p "$dir"
    cat >"$dir/outpost.toml" <<EOF
[server]
listen = ["127.0.0.1:$OP_PORT"]
public_url = "$OP"
shutdown_grace = "2s"

[storage]
path = "$dir/data"

[[upstream]]
name = "docker.io"
url = "$UP"
tag_ttl = "10m"

[[access]]
repositories = ["docker.io/**"]
anonymous = ["pull"]
EOF
    start_bg "outpost-$INSTANCE" "$OUTPOST_BIN" serve --config "$dir/outpost.toml"
    OP_PID=$BG_PID
    registry_config "$WORK/distribution-$INSTANCE.yml" "$DP_PORT" "$WORK/distribution-$INSTANCE-data" "$UP"
    start_bg "distribution-$INSTANCE" docker-registry serve "$WORK/distribution-$INSTANCE.yml"
    DP_PID=$BG_PID
    wait_http "$OP/v2/" "$OP_PID" "outpost-$INSTANCE"
    wait_http "$DP/v2/" "$DP_PID" "distribution-$INSTANCE"
}

# stop_proxies: records each one's peak RSS, then stops both.
stop_proxies() {
    local hwm
    kill -0 "$OP_PID" 2>/dev/null || die "Outpost exited unexpectedly; see $WORK/outpost-$INSTANCE.err (KEEP=1)"
    kill -0 "$DP_PID" 2>/dev/null || die "distribution exited unexpectedly (KEEP=1 keeps its log)"
    hwm=$(proc_kib "$OP_PID" VmHWM)
    if ((hwm > OP_PEAK)); then OP_PEAK=$hwm; fi
    hwm=$(proc_kib "$DP_PID" VmHWM)
    if ((hwm > DP_PEAK)); then DP_PEAK=$hwm; fi
    stop_pid "$OP_PID"
    forget_pid "$OP_PID"
    stop_pid "$DP_PID"
    forget_pid "$DP_PID"
}

log "starting Outpost and the distribution proxy"
start_proxies
sleep 1
OP_IDLE=$(proc_kib "$OP_PID" VmRSS)
DP_IDLE=$(proc_kib "$DP_PID" VmRSS)

NG_URL=
if [[ -n $NGINX_BIN ]]; then
    NG_PORT=$(free_port)
    mkdir -p "$WORK/nginx/logs"
    # Workers run as an unprivileged user when started as root; let them read the file.
    chmod 755 "$WORK" "$WORK/files"
    chmod 644 "$LAYER"
    user_line=
    if [[ $EUID -eq 0 ]]; then user_line="user root;"; fi
    cat >"$WORK/nginx/nginx.conf" <<EOF
$user_line
worker_processes auto;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    types { }
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$NG_PORT;
        root $WORK/files;
    }
}
EOF
    start_bg nginx "$NGINX_BIN" -e "$WORK/nginx/logs/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf"
    wait_http "http://127.0.0.1:$NG_PORT/config" "$BG_PID" nginx
    NG_URL="http://127.0.0.1:$NG_PORT/layer"
fi

# ---------------------------------------------------------------------------- 1. warm GETs
# get_checked NAME URL: one full GET whose body must hash to the layer digest.
get_checked() {
    local sum
    sum=$(curl -fsS --max-time 300 "$2" | sha256_hex) || die "$1: GET $2 failed"
    [[ $sum == "$LAYER_SHA" ]] || die "$1: blob GET returned sha256:$sum, expected $LAYER_DIGEST"
}

# speed NAME URL [PID]: "bytes/s ticks" of one GET to /dev/null (status and size
# checked), ticks being the CPU time PID used meanwhile (0 without PID).
speed() {
    local out code size bps before=0 after=0
    if [[ -n ${3:-} ]]; then before=$(cpu_ticks "$3"); fi
    out=$(curl -sS --max-time 300 -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' "$2")
    if [[ -n ${3:-} ]]; then after=$(cpu_ticks "$3"); fi
    read -r code size bps <<<"$out"
    [[ $code == 200 && $size == "$LAYER_SIZE" ]] || die "$1: GET answered $code with $size bytes"
    echo "$bps $((after - before))"
}

median() {
    tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# get_time NAME URL: seconds for one GET to /dev/null (status and size checked).
get_time() {
    local out code size secs
    out=$(curl -sS --max-time 300 -o /dev/null -w '%{http_code} %{size_download} %{time_total}' "$2")
    read -r code size secs <<<"$out"
    [[ $code == 200 && $size == "$LAYER_SIZE" ]] || die "$1: GET answered $code with $size bytes"
    printf '%.2f' "$secs"
}

log "1. first (cold) GETs, then warm GETs of the ${LAYER_MIB} MiB blob"
DIRECT_FIRST=$(get_time direct "$UP/v2/$REPO/blobs/$LAYER_DIGEST")
OP_FIRST=$(get_time outpost "$OP_BLOB")
DP_FIRST=$(get_time distribution "$DP_BLOB")
get_checked outpost "$OP_BLOB"
get_checked distribution "$DP_BLOB"
if [[ -n $NG_URL ]]; then get_checked nginx "$NG_URL"; fi
op_speeds=
dp_speeds=
ng_speeds=
op_ticks=0
dp_ticks=0
for ((i = 0; i < GET_RUNS; i++)); do
    # Interleaved, so that a burst of load elsewhere on the machine hits all of them.
    out=$(speed outpost "$OP_BLOB" "$OP_PID")
    op_speeds+=" ${out% *}"
    op_ticks=$((op_ticks + ${out#* }))
    out=$(speed distribution "$DP_BLOB" "$DP_PID")
    dp_speeds+=" ${out% *}"
    dp_ticks=$((dp_ticks + ${out#* }))
    if [[ -n $NG_URL ]]; then
        out=$(speed nginx "$NG_URL")
        ng_speeds+=" ${out% *}"
    fi
done
# CPU time per GET is steadier than throughput on a busy machine: it does not depend on
# who else had the CPU.
OP_GET_CPU=$(awk -v t="$op_ticks" -v n="$GET_RUNS" -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", t * 1000 / hz / n }')
DP_GET_CPU=$(awk -v t="$dp_ticks" -v n="$GET_RUNS" -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", t * 1000 / hz / n }')
to_mbs() {
    awk '{ for (i = 1; i <= NF; i++) printf "%s%.0f", (i > 1 ? " " : ""), $i / 1e6; print "" }' <<<"$1"
}
OP_GET=$(median <<<"$op_speeds" | awk '{ printf "%.0f", $1 / 1e6 }')
DP_GET=$(median <<<"$dp_speeds" | awk '{ printf "%.0f", $1 / 1e6 }')
NG_GET=
if [[ -n $NG_URL ]]; then NG_GET=$(median <<<"$ng_speeds" | awk '{ printf "%.0f", $1 / 1e6 }'); fi

# ---------------------------------------------------------------------------- 2. manifests
# HEAD load comes from ab: wrk 4.1 waits for a body after a HEAD response that carries a
# Content-Length (as registries must), so it never completes one. wrk, multi-threaded
# and with finer latency figures, drives a GET-by-tag run instead.
cat >"$WORK/get.lua" <<EOF
wrk.headers["Accept"] = "$ACCEPT"
EOF

# head_digest NAME URL: a manifest HEAD must give the pushed manifest's digest.
head_digest() {
    local digest
    digest=$(curl -fsS -o /dev/null -I -H "Accept: $ACCEPT" -w '%header{docker-content-digest}' "$2") ||
        die "$1: manifest HEAD failed"
    [[ $digest == "$MANIFEST_DIGEST" ]] ||
        die "$1: manifest HEAD gave Docker-Content-Digest '$digest', expected $MANIFEST_DIGEST"
}

# cpu_per_request TICKS REQUESTS: microseconds of CPU per request.
cpu_per_request() {
    awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.0f", t * 1e6 / hz / n; else print "-" }'
}

# run_ab NAME URL PID: HEAD load; sets RPS, P99 (ms), BAD (failed + non-2xx), UPREQ, and
# CPU_US (the CPU time PID spent per request, in microseconds).
run_ab() {
    local name=$1 url=$2 pid=$3 before out ticks
    head_digest "$name" "$url"
    sleep 0.5
    before=$(wc -l <"$UP_LOG")
    ticks=$(cpu_ticks "$pid")
    # -n after -t: -t alone caps the run at 50000 requests. ab allocates 32 bytes per
    # request of -n up front, so allow for 200k requests/s and no more.
    run_waiting "$WORK/ab-$name.txt" timeout $((LOAD_SECONDS + 60)) ab -q -k -i -c "$CONNECTIONS" \
        -t "$LOAD_SECONDS" -n $((LOAD_SECONDS * 200000)) -e "$WORK/ab-$name.csv" \
        -H "Accept: $ACCEPT" "$url" ||
        die "$name: ab failed: $(cat "$WORK/ab-$name.txt")"
    ticks=$(($(cpu_ticks "$pid") - ticks))
    out=$(cat "$WORK/ab-$name.txt")
    sleep 0.5
    UPREQ=$(($(wc -l <"$UP_LOG") - before))
    CPU_US=$(cpu_per_request "$ticks" "$(awk '/^Complete requests:/ { print $3 }' <<<"$out")")
    RPS=$(awk '/^Requests per second:/ { printf "%.0f", $4 }' <<<"$out")
    P99=$(awk -F, '$1 == "99" { printf "%.2f", $2 }' "$WORK/ab-$name.csv")
    BAD=$(awk '/^Failed requests:/ || /^Non-2xx responses:/ { n += $NF } END { print n + 0 }' <<<"$out")
    [[ -n $RPS && -n $P99 ]] || die "$name: could not read ab's output: $out"
}

# run_wrk NAME URL PID: GET load; sets RPS, P99 (ms), BAD (non-2xx + socket errors), UPREQ,
# CPU_US.
run_wrk() {
    local name=$1 url=$2 pid=$3 before out ticks
    sleep 0.5
    before=$(wc -l <"$UP_LOG")
    ticks=$(cpu_ticks "$pid")
    run_waiting "$WORK/wrk-$name.txt" timeout $((LOAD_SECONDS + 60)) wrk -t"$WRK_THREADS" \
        -c"$CONNECTIONS" -d"${LOAD_SECONDS}s" --latency -s "$WORK/get.lua" "$url" ||
        die "$name: wrk failed: $(cat "$WORK/wrk-$name.txt")"
    ticks=$(($(cpu_ticks "$pid") - ticks))
    out=$(cat "$WORK/wrk-$name.txt")
    sleep 0.5
    UPREQ=$(($(wc -l <"$UP_LOG") - before))
    CPU_US=$(cpu_per_request "$ticks" "$(awk '/ requests in / { print $1 }' <<<"$out")")
    RPS=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")
    P99=$(awk '$1 == "99%" {
        v = $2; u = v; sub(/[a-z]+$/, "", v); sub(/^[0-9.]+/, "", u)
        if (u == "us") v /= 1000; else if (u == "s") v *= 1000; else if (u == "m") v *= 60000
        printf "%.2f", v }' <<<"$out")
    BAD=$(awk '/Non-2xx or 3xx responses:/ { n += $NF }
        /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' <<<"$out")
    [[ -n $RPS && -n $P99 && $RPS != 0 ]] || die "$name: no usable wrk result: $out"
}

log "2. manifest HEAD (ab, ${LOAD_SECONDS}s) against Outpost"
run_ab outpost "$OP_MANIFEST" "$OP_PID"
OP_HRPS=$RPS OP_HP99=$P99 OP_HBAD=$BAD OP_HUP=$UPREQ OP_HCPU=$CPU_US
log "2. manifest HEAD (ab, ${LOAD_SECONDS}s) against distribution"
run_ab distribution "$DP_MANIFEST" "$DP_PID"
DP_HRPS=$RPS DP_HP99=$P99 DP_HBAD=$BAD DP_HUP=$UPREQ DP_HCPU=$CPU_US
log "2. manifest GET (wrk, ${LOAD_SECONDS}s) against Outpost"
run_wrk outpost "$OP_MANIFEST" "$OP_PID"
OP_GRPS=$RPS OP_GP99=$P99 OP_GBAD=$BAD OP_GUP=$UPREQ OP_GCPU=$CPU_US
log "2. manifest GET (wrk, ${LOAD_SECONDS}s) against distribution"
run_wrk distribution "$DP_MANIFEST" "$DP_PID"
DP_GRPS=$RPS DP_GP99=$P99 DP_GBAD=$BAD DP_GUP=$UPREQ DP_GCPU=$CPU_US

# ---------------------------------------------------------------------------- 3. cold pull
# pull_time NAME REF: sets PULL_SECS to the time skopeo takes to copy REF into a fresh
# dir: layout.
pull_time() {
    local name=$1 ref=$2 t0 t1
    rm -rf "$WORK/pull"
    t0=$(date +%s.%N)
    run_waiting "$WORK/skopeo-$name.log" timeout 300 skopeo --insecure-policy copy --quiet \
        --src-tls-verify=false "docker://$ref" "dir:$WORK/pull" ||
        { cat "$WORK/skopeo-$name.log" >&2; die "$name: skopeo copy failed"; }
    t1=$(date +%s.%N)
    [[ $(sha256_hex <"$WORK/pull/$LAYER_SHA") == "$LAYER_SHA" ]] ||
        die "$name: pulled layer has the wrong digest"
    rm -rf "$WORK/pull"
    PULL_SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
}

log "3. cold pulls, $COLD_RUNS rounds (fresh storage for both proxies each round)"
UP_HOST="127.0.0.1:$UP_PORT"
direct_times=
op_times=
dp_times=
for ((round = 0; round < COLD_RUNS; round++)); do
    stop_proxies
    start_proxies
    pull_time direct "$UP_HOST/$REPO:$TAG"
    direct_times+=" $PULL_SECS"
    pull_time outpost "127.0.0.1:$OP_PORT/docker.io/$REPO:$TAG"
    op_times+=" $PULL_SECS"
    pull_time distribution "127.0.0.1:$DP_PORT/$REPO:$TAG"
    dp_times+=" $PULL_SECS"
done
DIRECT_PULL=$(median <<<"$direct_times")
OP_PULL=$(median <<<"$op_times")
DP_PULL=$(median <<<"$dp_times")

# ---------------------------------------------------------------------------- 4. coalescing
# coalesce NAME URL: CONCURRENT simultaneous GETs; sets CO_UP (upstream blob GETs),
# CO_SECS (wall time until the last client finished); every body's sha256 is checked.
coalesce() {
    local name=$1 url=$2 before after t0 t1 i bad=0 pids=()
    local pattern="\"GET /v2/$REPO/blobs/$LAYER_DIGEST "
    before=$(upstream_count "$pattern")
    mkdir -p "$WORK/co-$name"
    t0=$(date +%s.%N)
    for ((i = 0; i < CONCURRENT; i++)); do
        (curl -fsS --max-time 300 "$url" | sha256_hex >"$WORK/co-$name/$i") 2>"$WORK/co-$name/$i.err" &
        pids+=("$!")
        PIDS+=("$!")
    done
    for i in "${pids[@]}"; do
        wait "$i" || bad=$((bad + 1))
        forget_pid "$i"
    done
    t1=$(date +%s.%N)
    for ((i = 0; i < CONCURRENT; i++)); do
        [[ $(cut -d' ' -f1 "$WORK/co-$name/$i") == "$LAYER_SHA" ]] || {
            bad=$((bad + 1))
            echo "$name client $i: $(cat "$WORK/co-$name/$i" "$WORK/co-$name/$i.err")" >&2
        }
    done
    ((bad == 0)) || die "$name: $bad of $CONCURRENT concurrent GETs failed or had the wrong digest"
    sleep 0.5
    after=$(upstream_count "$pattern")
    CO_UP=$((after - before))
    CO_SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
}

log "4. $CONCURRENT concurrent cold GETs (fresh storage for both proxies)"
stop_proxies
start_proxies
coalesce outpost "$OP_BLOB"
OP_CO=$CO_UP OP_CO_SECS=$CO_SECS
coalesce distribution "$DP_BLOB"
DP_CO=$CO_UP DP_CO_SECS=$CO_SECS
stop_proxies

# ---------------------------------------------------------------------------- report

row "metric" "outpost" "distribution" "ratio" "target" "met"
check "$OP_GET >= 1.5 * $DP_GET"
row "warm ${LAYER_MIB} MiB GET, median MB/s" "$OP_GET" "$DP_GET" "$(ratio "$OP_GET" "$DP_GET")" ">= 1.5x distribution" "$OK"
if [[ -n $NG_GET ]]; then
    check "$OP_GET >= 0.9 * $NG_GET"
    row "  vs nginx sendfile ($NG_GET MB/s)" "$(ratio "$OP_GET" "$NG_GET")" "$(ratio "$DP_GET" "$NG_GET")" "-" ">= 0.90x nginx" "$OK"
fi
row "  server CPU per warm GET, ms" "$OP_GET_CPU" "$DP_GET_CPU" "$(ratio "$OP_GET_CPU" "$DP_GET_CPU")" "-" "-"
row "first (cold) GET, s (direct $DIRECT_FIRST s)" "$OP_FIRST" "$DP_FIRST" "$(ratio "$OP_FIRST" "$DP_FIRST")" "-" "-"
check "$OP_HRPS >= 2 * $DP_HRPS"
row "manifest HEAD req/s (ab -c$CONNECTIONS)" "$OP_HRPS" "$DP_HRPS" "$(ratio "$OP_HRPS" "$DP_HRPS")" ">= 2x distribution" "$OK"
row "  HEAD p99 latency, ms" "$OP_HP99" "$DP_HP99" "$(ratio "$OP_HP99" "$DP_HP99")" "-" "-"
row "  server CPU per HEAD, us" "$OP_HCPU" "$DP_HCPU" "$(ratio "$OP_HCPU" "$DP_HCPU")" "-" "-"
check "$OP_HBAD == 0"
row "  HEAD failed/non-2xx" "$OP_HBAD" "$DP_HBAD" "-" "outpost 0" "$OK"
check "$OP_HUP == 0"
row "  upstream requests during HEAD run" "$OP_HUP" "$DP_HUP" "-" "outpost 0" "$OK"
row "manifest GET req/s (wrk -c$CONNECTIONS)" "$OP_GRPS" "$DP_GRPS" "$(ratio "$OP_GRPS" "$DP_GRPS")" "-" "-"
row "  GET p99 latency, ms" "$OP_GP99" "$DP_GP99" "$(ratio "$OP_GP99" "$DP_GP99")" "-" "-"
row "  server CPU per GET, us" "$OP_GCPU" "$DP_GCPU" "$(ratio "$OP_GCPU" "$DP_GCPU")" "-" "-"
check "$OP_GBAD == 0"
row "  GET errors/non-2xx" "$OP_GBAD" "$DP_GBAD" "-" "outpost 0" "$OK"
check "$OP_GUP == 0"
row "  upstream requests during GET run" "$OP_GUP" "$DP_GUP" "-" "outpost 0" "$OK"
row "cold pull, s (direct $DIRECT_PULL s)" "$OP_PULL" "$DP_PULL" "$(ratio "$OP_PULL" "$DP_PULL")" "-" "-"
check "$OP_PULL <= 1.1 * $DIRECT_PULL"
row "  cold pull vs direct" "$(ratio "$OP_PULL" "$DIRECT_PULL")" "$(ratio "$DP_PULL" "$DIRECT_PULL")" "-" "<= 1.10x direct" "$OK"
check "$OP_CO == 1"
row "upstream GETs, $CONCURRENT cold GETs of blob" "$OP_CO" "$DP_CO" "-" "outpost 1" "$OK"
row "  time until all $CONCURRENT done, s" "$OP_CO_SECS" "$DP_CO_SECS" "$(ratio "$OP_CO_SECS" "$DP_CO_SECS")" "-" "-"
check "$OP_IDLE <= 16384"
row "RSS idle after start, MiB" "$(mib "$OP_IDLE")" "$(mib "$DP_IDLE")" "$(ratio "$OP_IDLE" "$DP_IDLE")" "outpost <= 16 MiB" "$OK"
row "RSS peak (VmHWM), MiB" "$(mib "$OP_PEAK")" "$(mib "$DP_PEAK")" "$(ratio "$OP_PEAK" "$DP_PEAK")" "-" "-"

echo
print_table
echo
echo "ratio = outpost / distribution. Warm GET runs, MB/s: outpost [$(to_mbs "$op_speeds")]," \
    "distribution [$(to_mbs "$dp_speeds")]${NG_GET:+, nginx [$(to_mbs "$ng_speeds")]}."
echo "Cold pull rounds, s: direct [${direct_times# }], outpost [${op_times# }], distribution [${dp_times# }]."
echo "load average:    $(cut -d' ' -f1-3 /proc/loadavg) (at end); run took $((SECONDS - START_TIME)) s."
if ((MISSED > 0)); then
    echo "$MISSED target(s) missed."
    if [[ $STRICT == 1 ]]; then exit 1; fi
fi
exit 0
