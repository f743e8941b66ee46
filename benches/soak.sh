#!/usr/bin/env bash
# Soak and fault run: CLIENTS concurrent clients pull through Outpost for DURATION seconds
# from a real upstream (Debian's docker-registry) behind a fault proxy that answers 429
# and 503, stalls and resets connections at random; half-way through, Outpost is killed
# with SIGKILL and started again. Every blob a client receives is checked against its
# digest.
#
# Targets: 0 corrupt blobs served; 0 failed pulls outside the restart window (the cache
# was warmed first, so a healthy cache can answer every request whatever the upstream
# does); `outpost fsck` clean afterwards; Outpost's peak RSS bounded (reported).
#
# Run from the repository root:   benches/soak.sh
# Needs: docker-registry, curl, python3 (Debian: apt-get install -y docker-registry curl
# python3). Runs `cargo build --release --locked` first unless OUTPOST_BIN is set.
# Knobs: DURATION=300 CLIENTS=200 REPOS=4 TAGS=3 OUTPOST_BIN=… KEEP=1 STRICT=1.
# Not part of CI or scripts/test.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DURATION=${DURATION:-300}
CLIENTS=${CLIENTS:-200}
REPOS=${REPOS:-4}
TAGS=${TAGS:-3}
KEEP=${KEEP:-0}
STRICT=${STRICT:-0}
HERE=$(pwd)

NAME=soak
# shellcheck source=benches/lib.sh
source benches/lib.sh

for tool in docker-registry curl python3 sha256sum awk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH (Debian: apt-get install -y docker-registry curl python3)"
done

build_outpost

echo "== Outpost soak: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:         $(nproc) CPUs, $(awk '/^MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "outpost:         $("$OUTPOST_BIN" --version) ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "run:             $CLIENTS clients for ${DURATION}s over $((REPOS * TAGS)) images; kill -9 and restart at $((DURATION / 2))s"

# ---------------------------------------------------------------------------- upstream
UP_PORT=$(free_port)
cat >"$WORK/upstream.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/upstream-data
http:
  addr: 127.0.0.1:$UP_PORT
EOF
start_bg upstream docker-registry serve "$WORK/upstream.yml"
wait_http "http://127.0.0.1:$UP_PORT/v2/" "$BG_PID" upstream

push_blob() {
    local repo=$1 file=$2 digest location sep
    digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
    location=$(curl -fsS -X POST -D - -o /dev/null "http://127.0.0.1:$UP_PORT/v2/$repo/blobs/uploads/" |
        awk 'tolower($1) == "location:" { sub(/\r$/, "", $2); print $2 }')
    if [[ $location != http* ]]; then location="http://127.0.0.1:$UP_PORT$location"; fi
    sep='?'
    if [[ $location == *\?* ]]; then sep='&'; fi
    curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' -T "$file" "$location${sep}digest=$digest"
    echo "$digest"
}

log "seeding $((REPOS * TAGS)) images"
mkdir -p "$WORK/files"
echo "[" >"$WORK/images.json"
first=1
for ((r = 1; r <= REPOS; r++)); do
    for ((t = 1; t <= TAGS; t++)); do
        repo="soak/app$r"
        layer="$WORK/files/layer-$r-$t"
        head -c $(((RANDOM % 8 + 1) * 1024 * 1024)) /dev/urandom >"$layer"
        printf '{"architecture":"amd64","os":"linux","n":"%s-%s"}' "$r" "$t" >"$WORK/files/config-$r-$t"
        ld=$(push_blob "$repo" "$layer")
        cd=$(push_blob "$repo" "$WORK/files/config-$r-$t")
        printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' \
            "$cd" "$(stat -c %s "$WORK/files/config-$r-$t")" "$ld" "$(stat -c %s "$layer")" >"$WORK/files/manifest-$r-$t"
        curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
            --data-binary @"$WORK/files/manifest-$r-$t" "http://127.0.0.1:$UP_PORT/v2/$repo/manifests/v$t"
        if ((first == 0)); then echo "," >>"$WORK/images.json"; fi
        first=0
        printf '{"repo":"%s","tag":"v%s"}' "$repo" "$t" >>"$WORK/images.json"
    done
done
echo "]" >>"$WORK/images.json"
rm -f "$WORK"/files/layer-*

# ---------------------------------------------------------------------------- proxy
PROXY_PORT=$(free_port)
start_bg proxy python3 "$HERE/benches/soak.py" proxy "$PROXY_PORT" "$UP_PORT" "$WORK/faults.log"
wait_http "http://127.0.0.1:$PROXY_PORT/v2/" "$BG_PID" proxy

# ---------------------------------------------------------------------------- outpost
OP_PORT=$(free_port)
cat >"$WORK/outpost.toml" <<EOF
[server]
listen = ["127.0.0.1:$OP_PORT"]
public_url = "http://127.0.0.1:$OP_PORT"
shutdown_grace = "5s"

[storage]
path = "$WORK/outpost-data"

[[upstream]]
name = "central.corp"
url = "http://127.0.0.1:$PROXY_PORT"
tag_ttl = "10s"
revalidate_wait = "1s"
connect_timeout = "2s"
read_timeout = "5s"
breaker_cooldown = "2s"

[[access]]
repositories = ["central.corp/**"]
anonymous = ["pull"]
EOF
STARTS=0
start_outpost() {
    start_bg "outpost-$((++STARTS))" "$OUTPOST_BIN" serve --config "$WORK/outpost.toml"
    OP_PID=$BG_PID
    wait_http "http://127.0.0.1:$OP_PORT/v2/" "$OP_PID" "outpost-$STARTS"
}
start_outpost

log "warming the cache through the faults"
python3 - "$OP_PORT" "$WORK/images.json" <<'EOF'
import hashlib, http.client, json, sys, time
port, images = int(sys.argv[1]), json.load(open(sys.argv[2]))
accept = "application/vnd.oci.image.manifest.v1+json"
def get(path, headers={}):
    for _ in range(100):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            body = r.read()
            if r.status == 200:
                return body
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.2)
    sys.exit(f"warming {path} failed")
for image in images:
    m = json.loads(get(f"/v2/central.corp/{image['repo']}/manifests/{image['tag']}", {"Accept": accept}))
    for layer in [m["config"]] + m["layers"]:
        blob = get(f"/v2/central.corp/{image['repo']}/blobs/{layer['digest']}")
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
EOF

# ---------------------------------------------------------------------------- soak
log "soaking: $CLIENTS clients for ${DURATION}s"
: >"$WORK/faults.log"
python3 "$HERE/benches/soak.py" clients "$OP_PORT" "$WORK/images.json" "$DURATION" "$CLIENTS" "$WORK/result.json" &
CLIENTS_PID=$!
PIDS+=("$CLIENTS_PID")
START=$(date +%s.%N)
HWM=0
sample() {
    local v
    v=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$OP_PID/status" 2>/dev/null || echo 0)
    if [[ -n $v ]] && ((v > HWM)); then HWM=$v; fi
}
half=$((DURATION / 2))
while (($(date +%s) - ${START%.*} < half)); do
    sample
    sleep 1
done
sample
log "kill -9 and restart"
KILLED=$(date +%s.%N)
kill -KILL "$OP_PID"
wait "$OP_PID" 2>/dev/null || true
start_outpost
READY=$(date +%s.%N)
while kill -0 "$CLIENTS_PID" 2>/dev/null; do
    sample
    sleep 1
done
wait "$CLIENTS_PID" || die "the clients failed"
stop_pid "$OP_PID"
FSCK=$("$OUTPOST_BIN" fsck --config "$WORK/outpost.toml" 2>&1 || true)

# ---------------------------------------------------------------------------- report
python3 - "$WORK/result.json" "$KILLED" "$READY" "$WORK/faults.log" "$HWM" "$FSCK" "$STRICT" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
killed, ready = float(sys.argv[2]), float(sys.argv[3])
faults = {}
for line in open(sys.argv[4]):
    kind = line.split()[1]
    faults[kind] = faults.get(kind, 0) + 1
hwm_mib = int(sys.argv[5]) / 1024
fsck = sys.argv[6]
strict = sys.argv[7] == "1"
# The restart window: from the kill until the restarted daemon answered, plus 2 s for
# connections that were mid-request when it died.
inside = [f for f in result["failures"] if killed - 0.5 <= f[0] <= ready + 2]
outside = [f for f in result["failures"] if not (killed - 0.5 <= f[0] <= ready + 2)]
fsck_clean = "0 problem(s)" in fsck
rows = [
    ("pulls completed", result["pulls"], "-"),
    ("blobs received / GiB", f"{result['blobs']} / {result['bytes'] / 2**30:.1f}", "-"),
    ("corrupt blobs", result["corrupt"], "0"),
    ("failed pulls outside the restart window", len(outside), "0"),
    ("failed pulls during the restart (%.1f s)" % (ready - killed), len(inside), "-"),
    ("faults injected (429/503/stall/reset)", "/".join(str(faults.get(k, 0)) for k in ("429", "503", "stall", "reset")), "-"),
    ("outpost peak RSS (VmHWM), MiB", f"{hwm_mib:.1f}", "bounded"),
    ("fsck after the run", "clean" if fsck_clean else "PROBLEMS", "clean"),
]
print()
width = max(len(r[0]) for r in rows)
for name, value, target in rows:
    print(f"{name:<{width}} | {value!s:>14} | target {target}")
for f in outside[:10]:
    print("  failure:", f)
missed = result["corrupt"] > 0 or outside or not fsck_clean
if missed:
    print("target(s) missed" + ("" if fsck_clean else "\n" + fsck))
    if strict:
        sys.exit(1)
EOF
