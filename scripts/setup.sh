#!/usr/bin/env bash
# Sets up a Debian/Ubuntu host for tailcalld: system packages, kernel headers for BCC,
# bpffs/tracefs mounts and the project's .venv. Idempotent: a second run only checks.
# Needs root (apt, mounts, /lib/modules links).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
KREL=$(uname -r)

log()  { echo "setup: $*" >&2; }
warn() { echo "setup: WARNING: $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup: must run as root (apt, bpffs mount, kernel headers)" >&2; exit 1; }

# Packages the daemon and its tests need. python3-bpfcc is bcc's Python binding: it is not on PyPI
# (PyPI's "bcc" is an unrelated project), so the venv sees it through --system-site-packages.
# systemd, dbus and procps: the tests run a real systemd (ci-systemd.sh) and journald.
# clang + libbpf-dev: handlers written in libbpf C (SEC(), vmlinux.h) are compiled with clang.
PKGS=(python3-venv python3-dev python3-bpfcc gcc pkg-config libsystemd-dev bpftool clang libbpf-dev systemd dbus procps)
# prometheus: the metrics tests scrape the daemon with a real Prometheus server and check the
# output with its promtool.
PKGS+=(prometheus)
# groff-base, man-db: the tests render tailcallctl's generated man page (man -l, groff -ww);
# zsh: they load its generated zsh completion.
PKGS+=(groff-base man-db zsh)
# gcc-multilib: the tests run real 32-bit (ia32) programs against the dispatcher's compat table.
[ "$(dpkg --print-architecture)" = amd64 ] && PKGS+=(gcc-multilib)
# podman + runc: tests/test_container.py builds the Dockerfile's image and runs it (scripts/podman.sh).
PKGS+=(podman runc)
# bpftrace: only the benchmark compares with it (`make bench` runs `setup.sh bench`).
[ "${1:-}" = bench ] && PKGS+=(bpftrace)

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

apt_install() {
  local need
  need=$(missing_pkgs "$@")
  [ -z "$need" ] && return 0
  log "installing: $need"
  if [ ! -f /var/lib/apt/periodic/tailcalld-updated ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
    apt-get update -qq
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/tailcalld-updated
  fi
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2
}

apt_install "${PKGS[@]}"

# BCC compiles C at run time against /lib/modules/$(uname -r)/{build,source}.
if [ ! -e "/lib/modules/$KREL/build/include" ]; then
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    apt_install "linux-headers-$KREL"
  else
    arch=$(dpkg --print-architecture)
    apt_install "linux-headers-$arch"
    build=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
    common=${build%-"$arch"}-common
    [ -d "$build" ] && [ -d "$common" ] || { echo "setup: no kernel headers found under /usr/src" >&2; exit 1; }
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$build" "/lib/modules/$KREL/build"
    ln -sfn "$common" "/lib/modules/$KREL/source"
    warn "no headers packaged for kernel $KREL; linked $(basename "$build") instead." \
         "Handlers that use UAPI types and helpers work; layouts of kernel-internal structs may differ."
  fi
fi

# bpffs holds the pinned dispatcher; tracefs is where bpf_trace_printk output is read.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
if [ -d /sys/kernel/tracing ] && ! mountpoint -q /sys/kernel/tracing; then
  mount -t tracefs tracefs /sys/kernel/tracing || warn "could not mount tracefs"
fi

# The Dockerfile's FROM (debian:bookworm-slim) in local storage: no container registry may answer,
# so scripts/podman.sh makes it from the host's apt mirror when a pull fails (once; kept).
bash scripts/podman.sh base || warn "no debian:bookworm-slim image for podman: tests/test_container.py will fail"

# The venv must be made by the distro's python3: only it sees python3-bpfcc.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  log "creating $VENV"
  rm -rf "$VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing tailcalld (editable) into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q -e '.[test]' >&2
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
# journalctl -x explains tailcalld's entries (contrib/tailcalld.catalog) for a daemon run from
# this checkout too, not only after `make install`: journalctl reads catalogs from
# /usr/lib/systemd/catalog and /usr/local/lib/systemd/catalog only.
bash scripts/install.sh catalog
log "ready: $VENV/bin/tailcalld, $VENV/bin/tailcallctl"
