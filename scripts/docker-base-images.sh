#!/usr/bin/env bash
# Makes the two base images the Dockerfile names, for an engine that cannot pull them (a build
# machine with no registry). A user with a registry never runs this: `docker build` pulls the
# public images and the Dockerfile is the same.
#
#   debian:bookworm-slim     a Debian bookworm root made by debootstrap (minbase variant)
#   rust:1.95-slim-bookworm  that root plus gcc/libc6-dev and this machine's Rust toolchain,
#                            laid out as the public image lays it out (/usr/local/cargo/bin on PATH)
#
# Usage: scripts/docker-base-images.sh [--force]     (root: debootstrap and chroot need it)
# Images already present are kept unless --force. DEBIAN_MIRROR overrides the mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

force=""
[ "${1:-}" = "--force" ] && force=1
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# The tags come from the Dockerfile itself, so the two cannot drift apart.
builder=$(awk '/^FROM / && $2 ~ /^rust:/ {print $2; exit}' Dockerfile)
runtime=$(awk '/^FROM / && $2 ~ /^debian:/ {print $2; exit}' Dockerfile)
[ -n "$builder" ] && [ -n "$runtime" ] || { echo "Dockerfile: expected a rust: and a debian: FROM line" >&2; exit 1; }

have() { docker image inspect "$1" >/dev/null 2>&1; }
if [ -z "$force" ] && have "$builder" && have "$runtime"; then
  echo "base images present: $builder, $runtime (--force remakes them)"
  exit 0
fi

# The builder must hold the toolchain its tag names: rust:1.95-... gets this machine's 1.95.x.
want=$(echo "$builder" | sed -E 's/^rust:([0-9]+\.[0-9]+).*/\1/')
sysroot=$(rustc --print sysroot)
have_version=$(rustc --version | awk '{print $2}')
case "$have_version" in
  "$want" | "$want".*) ;;
  *) echo "the Dockerfile wants Rust $want, this machine has $have_version" >&2; exit 1 ;;
esac

if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

work=$(mktemp -d /var/tmp/base-images.XXXXXX)
trap 'umount "$work/root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
root="$work/root"

echo "== debootstrap bookworm (minbase) from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -30 "$work/debootstrap.log"; exit 1; }

slim() {  # what the public slim images leave out: package caches, lists, docs, man pages
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
         "$root"/var/log/*.log "$root"/tmp/*
}
import() {  # tag, then --change arguments
  local tag=$1; shift
  tar --numeric-owner -C "$root" -c . | docker import "$@" - "$tag" >/dev/null
  echo "made $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}
path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

slim
import "$runtime" --change "ENV PATH=$path" --change 'CMD ["bash"]'

echo "== $builder: gcc, libc6-dev, ca-certificates and Rust $have_version"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"
chroot "$root" apt-get update -qq
chroot "$root" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates > "$work/apt.log" 2>&1 \
  || { tail -30 "$work/apt.log"; exit 1; }
umount "$root/proc"
: > "$root/etc/resolv.conf"
# cargo fetches crates over TLS with this machine's trust store (it may hold the CA of a
# TLS-inspecting proxy that the Debian bundle lacks).
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"

toolchain="$root/usr/local/rustup/toolchains/$have_version-x86_64-unknown-linux-gnu"
mkdir -p "$toolchain" "$root/usr/local/cargo/bin"
cp -a "$sysroot/bin" "$sysroot/lib" "$toolchain/"   # share/ (docs) left out
for tool in cargo rustc rustdoc; do
  ln -s "../../rustup/toolchains/$have_version-x86_64-unknown-linux-gnu/bin/$tool" \
        "$root/usr/local/cargo/bin/$tool"
done
slim
import "$builder" \
  --change "ENV RUSTUP_HOME=/usr/local/rustup" \
  --change "ENV CARGO_HOME=/usr/local/cargo" \
  --change "ENV RUST_VERSION=$have_version" \
  --change "ENV PATH=/usr/local/cargo/bin:$path" \
  --change 'CMD ["bash"]'
