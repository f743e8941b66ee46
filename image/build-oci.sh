#!/usr/bin/env bash
# Builds an OCI image layout of Outpost without a container engine: one gzipped layer
# holding the release binary without its debug sections, the shared libraries it links
# (glibc and libgcc_s, copied from this machine), a CA bundle and a default config, plus
# the config JSON, manifest, index.json and oci-layout that skopeo, containerd, podman
# and registries read.
#
# The result is reproducible: the same binary and the same host libraries give the same
# digests (objcopy's output depends only on its input; fixed mtimes, sorted entries,
# numeric owners, gzip without name or time).
#
# Usage: image/build-oci.sh [--binary FILE] [--out DIR] [--tag TAG]
#   --binary FILE  use this binary instead of running `cargo build --release --locked`
#   --out DIR      where the layout goes (default: image/out/outpost-oci)
#   --tag TAG      the ref name in index.json (default: the version in Cargo.toml)
# SOURCE_DATE_EPOCH, if set, is the timestamp of every file and of the image (default 0).
#
# Then, for example:
#   skopeo inspect oci:image/out/outpost-oci:0.1.0
#   skopeo copy oci:image/out/outpost-oci:0.1.0 docker://registry.example/outpost:0.1.0
set -euo pipefail

binary=""
out=""
tag=""
while (($# > 0)); do
    case $1 in
        --binary) binary=${2:?--binary needs a file}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --tag) tag=${2:?--tag needs a value}; shift 2 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "build-oci.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# Paths given are relative to where the script was called from; then work from the
# repository root.
[[ -z $binary ]] || binary=$(realpath -m -- "$binary")
[[ -z $out ]] || out=$(realpath -m -- "$out")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${out:-image/out/outpost-oci}

# Replace only what is empty or an earlier layout, never a directory given by mistake.
if [[ -e $out ]] && [[ ! -f $out/oci-layout ]] && [[ -n $(ls -A "$out") ]]; then
    echo "build-oci.sh: $out exists and is not an OCI layout; not overwriting it" >&2
    exit 1
fi

for tool in tar gzip sha256sum ldd objcopy; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build-oci.sh: $tool is required" >&2; exit 1; }
done

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
tag=${tag:-$version}
epoch=${SOURCE_DATE_EPOCH:-0}
[[ $epoch =~ ^[0-9]+$ ]] || { echo "build-oci.sh: SOURCE_DATE_EPOCH must be whole seconds" >&2; exit 2; }
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
# The uid and gid the daemon runs as (distroless's "nonroot"); it owns /var/lib/outpost.
uid=65532

case $(uname -m) in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) echo "build-oci.sh: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac

if [[ -z $binary ]]; then
    echo "==== cargo build --release --locked ===="
    cargo build --release --locked
    binary="${CARGO_TARGET_DIR:-target}/release/outpost"
fi
[[ -x $binary ]] || { echo "build-oci.sh: $binary is not an executable" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{usr/local/bin,etc/outpost,etc/ssl/certs,var/lib/outpost,tmp}

# The release profile keeps line tables for readable backtraces: about 50 MB of a 66 MB
# binary. The image gets a copy without debug sections (about 17 MB); it keeps the symbol
# table, so a panic's backtrace still names functions, and the GNU build-id note, which
# ties it to the unstripped binary for symbolizing. The binary itself stays as built.
objcopy --strip-debug "$binary" "$root/usr/local/bin/outpost"
chmod 0755 "$root/usr/local/bin/outpost"
shipped="$root/usr/local/bin/outpost"

# The binary links glibc dynamically (a musl target is not assumed to be installed, and
# a static glibc breaks name resolution through NSS), so the libraries it needs ride
# along at the paths the dynamic loader looks them up by. ldd prints "name => path" for
# libraries and the bare path for the loader; linux-vdso has neither.
while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    chmod 0755 "$root$lib"
done < <(ldd "$binary" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p' | sort -u)
if ! find "$root" -name 'ld-linux*' | grep -q .; then
    echo "build-oci.sh: ldd named no dynamic loader for $binary" >&2
    exit 1
fi

# Trust roots for upstream registries over HTTPS.
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
else
    echo "build-oci.sh: warning: no /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates); the image will trust no upstream" >&2
fi

# Name service: files for users and hosts, DNS for the rest (glibc has both built in).
printf 'root:x:0:0:root:/root:/sbin/nologin\noutpost:x:%s:%s:Outpost:/var/lib/outpost:/sbin/nologin\n' "$uid" "$uid" >"$root/etc/passwd"
printf 'root:x:0:\noutpost:x:%s:\n' "$uid" >"$root/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$root/etc/hosts"

# The embedded default config with its data directory moved to the volume; the shipped
# (stripped) binary writes it and checks the result, so it is known to run.
"$shipped" config default |
    sed 's|^path = "./outpost-data"|path = "/var/lib/outpost"|' >"$root/etc/outpost/outpost.toml"
grep -q '^path = "/var/lib/outpost"' "$root/etc/outpost/outpost.toml" ||
    { echo "build-oci.sh: could not set storage.path in the default config" >&2; exit 1; }
"$shipped" config check --config "$root/etc/outpost/outpost.toml" >/dev/null

find "$root" -type d -exec chmod 0755 {} +
find "$root/etc" -type f -exec chmod 0644 {} +
chmod 1777 "$root/tmp"
chmod 0700 "$root/var/lib/outpost"

# Every entry root-owned except /var/lib/outpost, which is appended with the daemon's
# owner. It sorts last, so the archive stays in name order.
layer="$work/layer.tar"
tar_opts=(--format=gnu --sort=name --mtime="@$epoch" --numeric-owner --no-acls --no-xattrs --no-selinux)
tar -C "$root" "${tar_opts[@]}" --owner=0 --group=0 --exclude=./var/lib/outpost -cf "$layer" .
tar -C "$root" "${tar_opts[@]}" --owner="$uid" --group="$uid" --no-recursion -rf "$layer" ./var/lib/outpost
[[ $(tar -tf "$layer" | tail -n1) == ./var/lib/outpost/ ]] ||
    { echo "build-oci.sh: /var/lib/outpost is not the last entry of the layer" >&2; exit 1; }

gzip -9 -n <"$layer" >"$layer.gz"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

rm -rf "$out"
mkdir -p "$out/blobs/sha256"

diff_id=$(sha "$layer")
layer_digest=$(sha "$layer.gz")
layer_size=$(size "$layer.gz")
mv "$layer.gz" "$out/blobs/sha256/$layer_digest"

# JSON is written compact and in a fixed key order, so its digest is stable.
config="$work/config.json"
printf '%s' \
    '{"architecture":"'"$arch"'","os":"linux","created":"'"$created"'",' \
    '"config":{"User":"'"$uid:$uid"'",' \
    '"ExposedPorts":{"5000/tcp":{}},' \
    '"Env":["PATH=/usr/local/bin:/usr/bin:/bin","OUTPOST_LOG=info"],' \
    '"Entrypoint":["/usr/local/bin/outpost"],' \
    '"Cmd":["serve","--config","/etc/outpost/outpost.toml"],' \
    '"Volumes":{"/var/lib/outpost":{}},' \
    '"WorkingDir":"/var/lib/outpost",' \
    '"Labels":{"org.opencontainers.image.title":"outpost","org.opencontainers.image.version":"'"$version"'","org.opencontainers.image.licenses":"Apache-2.0"}},' \
    '"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},' \
    '"history":[{"created":"'"$created"'","created_by":"image/build-oci.sh"}]}' >"$config"
config_digest=$(sha "$config")
config_size=$(size "$config")
mv "$config" "$out/blobs/sha256/$config_digest"

manifest="$work/manifest.json"
printf '%s' \
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
    '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_digest"'","size":'"$config_size"'},' \
    '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer_digest"'","size":'"$layer_size"'}]}' >"$manifest"
manifest_digest=$(sha "$manifest")
manifest_size=$(size "$manifest")
mv "$manifest" "$out/blobs/sha256/$manifest_digest"

printf '%s' \
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",' \
    '"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest_digest"'","size":'"$manifest_size"',' \
    '"platform":{"architecture":"'"$arch"'","os":"linux"},' \
    '"annotations":{"org.opencontainers.image.ref.name":"'"$tag"'"}}]}' >"$out/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"

echo "wrote $out (tag $tag)"
echo "  binary   $(stat -c %s "$binary") bytes built, $(stat -c %s "$shipped") bytes shipped (debug sections stripped)"
echo "  manifest sha256:$manifest_digest"
echo "  layer    sha256:$layer_digest ($layer_size bytes gzipped)"
