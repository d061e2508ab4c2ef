#!/usr/bin/env bash
# Builds Porin's image from config/kubernetes/Containerfile (FROM scratch) with buildah: stages the
# porin binary (stripped) and the shared libraries ldd names for it, then builds. Nothing is pulled.
#   bash scripts/image.sh                      # release build, image porin:dev
#   bash scripts/image.sh --binary PATH --tag NAME:TAG
# Load it into a cluster's nodes as your cluster takes images (e.g. `buildah push porin:dev
# docker-archive:porin.tar`, then `ctr -n k8s.io images import porin.tar` on each node).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
binary=
tag=porin:dev
while (($#)); do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        *) echo "usage: $0 [--binary PATH] [--tag NAME:TAG]" >&2; exit 2 ;;
    esac
done
if ! command -v buildah >/dev/null; then
    [ "$(id -u)" -eq 0 ] || { echo "image.sh: buildah is missing (Debian package buildah)" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null
fi
if [ -z "$binary" ]; then
    (cd "$repo" && cargo build --release --locked -p porin)
    binary=$repo/target/release/porin
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rootfs/usr/bin"
objcopy --strip-debug "$binary" "$stage/rootfs/usr/bin/porin"
# The loader and every library, at the path the binary finds it (ldd: "name => /path (addr)" or
# "/path (addr)"; the vDSO has no file).
ldd "$binary" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | while read -r lib; do
    mkdir -p "$stage/rootfs$(dirname "$lib")"
    cp -L "$lib" "$stage/rootfs$lib"
done
cp "$repo/config/kubernetes/Containerfile" "$stage/Containerfile"
buildah build --quiet --layers=false -f "$stage/Containerfile" -t "$tag" "$stage" >/dev/null
echo "built $tag ($(du -sh "$stage/rootfs" | cut -f1) staged)"
