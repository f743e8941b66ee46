#!/usr/bin/env bash
# Outpost's scheduled mirroring vs `skopeo sync`, side by side, in one run, from one
# central registry.
#
# The setup (every process on 127.0.0.1, data in a temp dir, all stopped on exit): a
# central `docker-registry` (plain HTTP, filesystem storage, access log on, so requests
# and bytes can be counted per phase) holding REPOS x TAGS images. Every image has one
# base layer shared by all (BASE_MIB), one layer shared within its repository (REPO_MIB)
# and one of its own (TAG_MIB), random bytes in stored gzip blocks; about 150 MiB of
# unique content by default. skopeo syncs into a second, plain `docker-registry` (the
# usual way to run it at a site: it then skips blobs the destination holds); Outpost runs
# `outpost mirror run` on one `[[mirror]]` job naming the same repositories, with no
# daemon (the CLI does the work on the store).
#
# What it measures:
#   1. Cold mirror: wall time; upstream requests and blob bytes; Outpost's peak RSS.
#   2. Unchanged rerun: wall time and upstream requests, per selected tag.
#   3. Bandwidth cap: a fresh store, one repository, `bandwidth = BANDWIDTH_MIB MiB/s`:
#      the achieved rate (bytes fetched / wall time, the first second's burst included).
#   4. Resume: a fresh store, the same capped job killed with SIGKILL after CUT_SECONDS,
#      then rerun without the cap: blob bytes the rerun fetched vs the bytes missing
#      (blob bytes selected minus what was on disk, committed or partial, at the kill).
#
# Run from the repository root:   benches/mirror-compare.sh
# Needs: docker-registry, skopeo, curl, python3, sha256sum (Debian: apt-get install -y
# docker-registry skopeo curl python3). Runs `cargo build --release --locked` first (not
# timed; set OUTPOST_BIN to skip it). About 2 minutes on 2 cores plus the build, and
# ~1 GiB free in TMPDIR. Not part of CI or scripts/test: figures depend on the machine.
#
# Knobs (environment): REPOS=3 TAGS=5 BASE_MIB=60 REPO_MIB=20 TAG_MIB=2 BANDWIDTH_MIB=20
# CUT_SECONDS=3 OUTPOST_BIN=path KEEP=1 (keep the temp dir) STRICT=1 (exit 1 on a missed
# target).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

REPOS=${REPOS:-3}
TAGS=${TAGS:-5}
BASE_MIB=${BASE_MIB:-60}
REPO_MIB=${REPO_MIB:-20}
TAG_MIB=${TAG_MIB:-2}
BANDWIDTH_MIB=${BANDWIDTH_MIB:-20}
CUT_SECONDS=${CUT_SECONDS:-3}
KEEP=${KEEP:-0}
STRICT=${STRICT:-0}

NAME="mirror-compare"
# shellcheck source=benches/lib.sh
source benches/lib.sh

missing=()
for tool in docker-registry skopeo curl python3 sha256sum awk; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]} > 0)); then
    die "not on PATH: ${missing[*]} (Debian: apt-get install -y docker-registry skopeo curl python3)"
fi

now() {
    date +%s.%N
}

elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'
}

# ---------------------------------------------------------------------------- build
build_outpost

version_of() {
    "$@" 2>&1 | head -n 1 || true
}
START_TIME=$SECONDS
UNIQUE_MIB=$((BASE_MIB + REPOS * REPO_MIB + REPOS * TAGS * TAG_MIB))
echo "== Outpost mirroring vs skopeo sync: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:         $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/^MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
echo "kernel:          $(uname -srm)"
echo "load average:    $(cut -d' ' -f1-3 /proc/loadavg) (at start)"
echo "outpost:         $(version_of "$OUTPOST_BIN" --version) ($(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+dirty'))"
echo "skopeo:          $(version_of skopeo --version)"
echo "distribution:    $(version_of docker-registry --version)"
echo "selection:       $REPOS repositories x $TAGS tags; layers: base ${BASE_MIB} MiB (all), ${REPO_MIB} MiB per repository, ${TAG_MIB} MiB per tag; ${UNIQUE_MIB} MiB unique"
echo

# ---------------------------------------------------------------------------- central
registry_config() {
    local file=$1 port=$2 data=$3
    cat >"$file" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $data
http:
  addr: 127.0.0.1:$port
  secret: outpost-bench
EOF
}

UP_PORT=$(free_port)
UP="http://127.0.0.1:$UP_PORT"
registry_config "$WORK/central.yml" "$UP_PORT" "$WORK/central-data"
start_bg central docker-registry serve "$WORK/central.yml"
wait_http "$UP/v2/" "$BG_PID" central
UP_LOG="$WORK/central.out"

# make_layer NAME MIB: a gzip stream of stored blocks of random bytes; prints its digest.
make_layer() {
    local file="$WORK/files/$1"
    head -c $(($2 * 1024 * 1024)) /dev/urandom | python3 -c 'import gzip, sys
sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read(), compresslevel=0, mtime=0))' >"$file"
    echo "sha256:$(sha256sum "$file" | cut -d' ' -f1)"
}

push_blob() {
    local repo=$1 file=$2 digest=$3 location sep
    location=$(curl -fsS -X POST -D - -o /dev/null "$UP/v2/$repo/blobs/uploads/" |
        awk 'tolower($1) == "location:" { sub(/\r$/, "", $2); print $2 }')
    [[ -n $location ]] || die "central gave no upload location"
    if [[ $location != http* ]]; then location="$UP$location"; fi
    sep='?'
    if [[ $location == *\?* ]]; then sep='&'; fi
    curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
        -T "$file" "$location${sep}digest=$digest"
}

log "creating and pushing $((REPOS * TAGS)) images (${UNIQUE_MIB} MiB unique)"
mkdir -p "$WORK/files"
BASE_DIGEST=$(make_layer base "$BASE_MIB")
REPO_NAMES=()
for ((r = 1; r <= REPOS; r++)); do
    repo="team/app$r"
    REPO_NAMES+=("$repo")
    repo_digest=$(make_layer "repo$r" "$REPO_MIB")
    push_blob "$repo" "$WORK/files/base" "$BASE_DIGEST"
    push_blob "$repo" "$WORK/files/repo$r" "$repo_digest"
    for ((t = 0; t < TAGS; t++)); do
        tag_digest=$(make_layer "tag$r-$t" "$TAG_MIB")
        push_blob "$repo" "$WORK/files/tag$r-$t" "$tag_digest"
        printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"Labels":{"tag":"%s-%s"}}}' "$r" "$t" >"$WORK/files/config$r-$t"
        config_digest="sha256:$(sha256sum "$WORK/files/config$r-$t" | cut -d' ' -f1)"
        push_blob "$repo" "$WORK/files/config$r-$t" "$config_digest"
        layers=""
        for pair in "base:$BASE_DIGEST" "repo$r:$repo_digest" "tag$r-$t:$tag_digest"; do
            name=${pair%%:*}
            digest=${pair#*:}
            layers+=$(printf '{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%d},' "$digest" "$(stat -c %s "$WORK/files/$name")")
        done
        printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[%s]}' \
            "$config_digest" "$(stat -c %s "$WORK/files/config$r-$t")" "${layers%,}" >"$WORK/files/manifest$r-$t"
        curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
            --data-binary @"$WORK/files/manifest$r-$t" "$UP/v2/$repo/manifests/v1.$t.0"
    done
done
rm -f "$WORK"/files/base "$WORK"/files/repo* "$WORK"/files/tag*
SELECTED_TAGS=$((REPOS * TAGS))

# The central's access log: one line per request, `"GET /v2/… HTTP/1.1" 200 <bytes> …`.
mark() {
    wc -l <"$UP_LOG"
}
# since MARK: the requests answered after MARK (lines), and their blob body bytes.
requests_since() {
    tail -n +"$(($1 + 1))" "$UP_LOG" | grep -c '"[A-Z]* /v2/' || true
}
blob_bytes_since() {
    tail -n +"$(($1 + 1))" "$UP_LOG" |
        awk '/"GET \/v2\/[^ ]*\/blobs\/sha256:/ { for (i = 1; i < NF; i++) if ($i ~ /^[0-9][0-9][0-9]$/ && $(i + 1) ~ /^[0-9]+$/) { sum += $(i + 1); break } } END { print sum + 0 }'
}
settle_log() {
    # The registry writes its access line as it answers; give the pipe a moment.
    curl -fso /dev/null "$UP/v2/?settle" || true
    sleep 0.5
}

# ---------------------------------------------------------------------------- outpost
# outpost_config DIR [EXTRA]: a config with one job mirroring every repository.
outpost_config() {
    local dir=$1 extra=${2:-} repos
    repos=$(printf '"%s", ' "${REPO_NAMES[@]}")
    mkdir -p "$dir"
    cat >"$dir/outpost.toml" <<EOF
[server]
listen = ["127.0.0.1:$(free_port)"]
public_url = "http://127.0.0.1:5000"

[storage]
path = "$dir/data"

[[upstream]]
name = "central.corp"
url = "$UP"

[[mirror]]
name = "bench"
upstream = "central.corp"
repositories = [${repos%, }]
tags = ["*"]
$extra
EOF
}

# run_outpost DIR: `outpost mirror run`, timing it and sampling its peak RSS (VmHWM).
run_outpost() {
    local dir=$1 t0 pid hwm=0 v status=0
    t0=$(now)
    "$OUTPOST_BIN" mirror run --config "$dir/outpost.toml" >"$dir/run.out" 2>"$dir/run.err" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        v=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        if [[ -n $v ]] && ((v > hwm)); then hwm=$v; fi
        sleep 0.05
    done
    wait "$pid" || status=$?
    RUN_SECS=$(elapsed "$t0" "$(now)")
    RUN_HWM=$hwm
    if ((status != 0)); then
        cat "$dir/run.out" "$dir/run.err" >&2
        die "outpost mirror run failed ($status)"
    fi
}

# ---------------------------------------------------------------------------- skopeo
DEST_PORT=$(free_port)
registry_config "$WORK/site.yml" "$DEST_PORT" "$WORK/site-data"
start_bg site docker-registry serve "$WORK/site.yml"
wait_http "http://127.0.0.1:$DEST_PORT/v2/" "$BG_PID" site

run_skopeo() {
    local t0 repo
    t0=$(now)
    for repo in "${REPO_NAMES[@]}"; do
        skopeo sync --src docker --dest docker --src-tls-verify=false --dest-tls-verify=false \
            "127.0.0.1:$UP_PORT/$repo" "127.0.0.1:$DEST_PORT/mirror" >>"$WORK/skopeo.log" 2>&1 ||
            die "skopeo sync failed; see $WORK/skopeo.log (KEEP=1)"
    done
    RUN_SECS=$(elapsed "$t0" "$(now)")
}

# ---------------------------------------------------------------------------- 1, 2
log "cold mirror: outpost"
outpost_config "$WORK/op-cold"
settle_log
m=$(mark)
run_outpost "$WORK/op-cold"
settle_log
OP_COLD=$RUN_SECS OP_HWM=$RUN_HWM
OP_COLD_REQ=$(requests_since "$m") OP_COLD_BYTES=$(blob_bytes_since "$m")

log "cold mirror: skopeo sync"
m=$(mark)
run_skopeo
settle_log
SK_COLD=$RUN_SECS
SK_COLD_REQ=$(requests_since "$m") SK_COLD_BYTES=$(blob_bytes_since "$m")

log "unchanged rerun: outpost"
m=$(mark)
run_outpost "$WORK/op-cold"
settle_log
OP_RERUN=$RUN_SECS OP_RERUN_REQ=$(requests_since "$m") OP_RERUN_BYTES=$(blob_bytes_since "$m")
grep -q "0 added, 0 updated, $SELECTED_TAGS unchanged, 0 failed" "$WORK/op-cold/run.out" ||
    die "outpost rerun was not unchanged: $(cat "$WORK/op-cold/run.out")"

log "unchanged rerun: skopeo sync"
m=$(mark)
run_skopeo
settle_log
SK_RERUN=$RUN_SECS SK_RERUN_REQ=$(requests_since "$m") SK_RERUN_BYTES=$(blob_bytes_since "$m")

# ---------------------------------------------------------------------------- 3
log "bandwidth cap: ${BANDWIDTH_MIB} MiB/s, one repository"
outpost_config "$WORK/op-cap" "bandwidth = \"${BANDWIDTH_MIB}MiB\""
sed -i "s|^repositories = .*|repositories = [\"${REPO_NAMES[0]}\"]|" "$WORK/op-cap/outpost.toml"
m=$(mark)
run_outpost "$WORK/op-cap"
settle_log
CAP_SECS=$RUN_SECS CAP_BYTES=$(blob_bytes_since "$m")
CAP_RATE=$(awk -v b="$CAP_BYTES" -v s="$CAP_SECS" 'BEGIN { printf "%.1f", b / s / 1048576 }')

# ---------------------------------------------------------------------------- 4
log "resume: the capped run killed after ${CUT_SECONDS}s, then rerun"
outpost_config "$WORK/op-cut" "bandwidth = \"${BANDWIDTH_MIB}MiB\""
sed -i "s|^repositories = .*|repositories = [\"${REPO_NAMES[0]}\"]|" "$WORK/op-cut/outpost.toml"
"$OUTPOST_BIN" mirror run --config "$WORK/op-cut/outpost.toml" >/dev/null 2>&1 &
cut_pid=$!
sleep "$CUT_SECONDS"
kill -KILL "$cut_pid" 2>/dev/null || true
wait "$cut_pid" 2>/dev/null || true
ON_DISK=$(find "$WORK/op-cut/data/blobs" "$WORK/op-cut/data/partial" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
sed -i '/^bandwidth = /d' "$WORK/op-cut/outpost.toml"
settle_log
m=$(mark)
run_outpost "$WORK/op-cut"
settle_log
RESENT=$(blob_bytes_since "$m")
# What the selection needs: every blob the capped run fetched whole, once.
MISSING=$((CAP_BYTES - ON_DISK))

# ---------------------------------------------------------------------------- report
mibs() {
    awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'
}
per_tag() {
    awk -v n="$1" -v t="$SELECTED_TAGS" 'BEGIN { printf "%.2f", n / t }'
}
row "metric" "outpost" "skopeo sync" "ratio" "target" "met"
check "$OP_COLD <= 1.0 * $SK_COLD"
row "cold mirror, s" "$OP_COLD" "$SK_COLD" "$(ratio "$OP_COLD" "$SK_COLD")" "<= 1.0x skopeo" "$OK"
row "  upstream requests" "$OP_COLD_REQ" "$SK_COLD_REQ" "$(ratio "$OP_COLD_REQ" "$SK_COLD_REQ")" "-" "-"
row "  upstream blob MiB (${UNIQUE_MIB} unique)" "$(mibs "$OP_COLD_BYTES")" "$(mibs "$SK_COLD_BYTES")" "$(ratio "$OP_COLD_BYTES" "$SK_COLD_BYTES")" "-" "-"
check "$OP_HWM <= 49152"
row "  peak RSS (VmHWM), MiB" "$(mibs $((OP_HWM * 1024)))" "-" "-" "<= 48 MiB" "$OK"
row "unchanged rerun, s" "$OP_RERUN" "$SK_RERUN" "$(ratio "$OP_RERUN" "$SK_RERUN")" "-" "-"
check "$OP_RERUN_REQ <= 2 * $SELECTED_TAGS + $REPOS && $OP_RERUN_REQ <= $SK_RERUN_REQ"
row "  upstream requests per tag ($SELECTED_TAGS tags)" "$(per_tag "$OP_RERUN_REQ")" "$(per_tag "$SK_RERUN_REQ")" "$(ratio "$OP_RERUN_REQ" "$SK_RERUN_REQ")" "<= 2 and <= skopeo" "$OK"
row "  upstream blob MiB" "$(mibs "$OP_RERUN_BYTES")" "$(mibs "$SK_RERUN_BYTES")" "-" "-" "-"
check "$CAP_RATE <= 1.1 * $BANDWIDTH_MIB && $CAP_RATE >= 0.9 * $BANDWIDTH_MIB"
row "bandwidth cap ${BANDWIDTH_MIB} MiB/s: achieved MiB/s" "$CAP_RATE" "-" "-" "within 10 %" "$OK"
check "$RESENT <= $MISSING + 1048576"
row "resume after kill -9: refetched MiB" "$(mibs "$RESENT")" "-" "-" "<= missing $(mibs "$MISSING") + 1" "$OK"

echo
print_table
echo
echo "ratio = outpost / skopeo sync. Upstream requests include token-free /v2/ probes and tag lists."
echo "Bandwidth: $(mibs "$CAP_BYTES") MiB in $CAP_SECS s. Resume: $(mibs "$ON_DISK") MiB on disk at the kill."
echo "load average:    $(cut -d' ' -f1-3 /proc/loadavg) (at end); run took $((SECONDS - START_TIME)) s."
if ((MISSED > 0)); then
    echo "$MISSED target(s) missed."
    if [[ $STRICT == 1 ]]; then exit 1; fi
fi
exit 0
