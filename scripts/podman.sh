#!/usr/bin/env bash
# scripts/podman.sh base | PODMAN ARGS...
# The container engine the tests use (tests/test_container.py): Debian's podman, run with runc and
# cgroupfs (crun refuses a hybrid cgroup layout such as these VMs'), and no default ulimits
# (raising RLIMIT_NOFILE/NPROC needs CAP_SYS_RESOURCE, which root may not have here).
#   base   install podman + runc (once) and make sure debian:bookworm-slim, the Dockerfile's FROM,
#          is in local storage: pulled if a registry answers, else debootstrapped from the host's
#          own apt mirror and imported, so a build never needs a container registry.
#   ARGS   any podman command line; `build` never pulls (--pull=never) and shares the host's
#          network, CA bundle and pip.conf, so apt and pip inside reach what the host reaches.
set -euo pipefail
CONF=${TAILCALLD_PODMAN_CONF:-/var/tmp/tailcalld-podman/containers.conf}
export CONTAINERS_CONF=$CONF
BASE_IMAGE=docker.io/library/debian:bookworm-slim

log() { echo "podman.sh: $*" >&2; }

install_engine() {
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
    log "installing podman and runc"
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
      podman runc >&2
  fi
  storage_on_overlayfs
  [ -f "$CONF" ] && return 0
  mkdir -p "$(dirname "$CONF")"
  printf '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

# podman's overlay driver cannot stack its layers on an overlayfs (the storage of a chroot or a
# container made with one, as fresh-machine.sh's). There the layers are plain copies (the vfs
# driver: more disk, no mounts; fuse-overlayfs was tried, and `podman exec` then found no root).
# Elsewhere the storage is left as podman's default.
storage_on_overlayfs() {
  local at=/var/lib/containers/storage
  while [ ! -e "$at" ]; do at=$(dirname "$at"); done
  [ "$(stat -f -c %T "$at")" = overlayfs ] || return 0
  local storage_conf
  storage_conf="$(dirname "$CONF")/storage.conf"
  if [ ! -f "$storage_conf" ]; then
    mkdir -p "$(dirname "$storage_conf")"
    printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
      > "$storage_conf.tmp"
    mv "$storage_conf.tmp" "$storage_conf"
  fi
  export CONTAINERS_STORAGE_CONF=$storage_conf
}

mirror() {  # the host's bookworm mirror, as apt itself parses its sources (never hard-coded)
  # shellcheck disable=SC2016  # $(SITE) is apt's format field, not a shell expansion
  apt-get indextargets --format '$(SITE) $(RELEASE)' 'Identifier: Packages' |
    awk '$2 == "bookworm" && !found { print $1; found = 1 }'
}

base() {
  install_engine
  podman image exists "$BASE_IMAGE" && return 0
  if timeout 60 podman pull -q "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
  log "no registry answers: building $BASE_IMAGE with debootstrap from the host's apt mirror"
  if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
      debootstrap >&2
  fi
  local m root
  m=$(mirror)
  [ -n "$m" ] || { log "no bookworm source in the host's apt sources"; exit 1; }
  root=$(mktemp -d /var/tmp/tailcalld-debootstrap.XXXXXX)
  # shellcheck disable=SC2064  # the folder's name is known now
  trap "rm -rf --one-file-system '$root'" EXIT
  # Own mount namespace: whatever debootstrap mounts in the target goes with it, even if killed.
  # ca-certificates now: a build mounts the host's /etc/ssl/certs read-only, where its setup would write.
  unshare --mount --propagation private debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$m" >&2
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import - "$BASE_IMAGE" >&2
}

case "${1:-}" in
  base) base ;;
  "") echo "usage: podman.sh base | PODMAN ARGS..." >&2; exit 2 ;;
  build)
    install_engine; shift
    extra=(--pull=never --network host -v /etc/ssl/certs:/etc/ssl/certs:ro)
    [ -f /etc/pip.conf ] && extra+=(-v /etc/pip.conf:/etc/pip.conf:ro)
    exec podman build "${extra[@]}" "$@" ;;
  *) install_engine; exec podman "$@" ;;
esac
