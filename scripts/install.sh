#!/usr/bin/env bash
# make install / make uninstall: tailcalld as a system service.
#
#   /opt/tailcalld                    PREFIX: a venv of its own (made from /usr/bin/python3 with
#                                     --system-site-packages, so it sees python3-bpfcc)
#   /usr/local/bin/tailcalld|ctl      BINDIR: symlinks into that venv
#   /etc/systemd/system/tailcalld.{service,socket}   UNITDIR; the service runs PREFIX/bin/tailcalld
#                                     with CONFDIR's config (rendered from contrib/'s template)
#   /usr/lib/systemd/catalog/tailcalld.catalog   CATALOGDIR (journalctl -x explanations)
#   /etc/tailcalld/tailcalld.toml     CONFDIR: from config/, never overwriting an edited one
#
# Uninstall (with the same variables) removes all of that but CONFDIR/tailcalld.toml when it
# was edited, and never touches the pins under /sys/fs/bpf (tracing stays as it is; see README).
#
# `install.sh catalog` installs the catalog alone (make setup runs it: journalctl -x explains
# the entries of a daemon run from a checkout too).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/opt/tailcalld}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CATALOGDIR=${CATALOGDIR:-/usr/lib/systemd/catalog}
CONFDIR=${CONFDIR:-/etc/tailcalld}
DEFAULT_CONF=config/tailcalld.toml
PRISTINE="$PREFIX/share/tailcalld.toml.default"  # what we installed, to tell an edited config

log() { echo "install: $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "install: must run as root" >&2; exit 1; }

# The unit names these paths: absolute, and nothing systemd would read as a specifier (%),
# a quote or a word break, nor sed as its own syntax.
for var in PREFIX CONFDIR; do
  [[ ${!var} =~ ^/[A-Za-z0-9._/+-]*$ ]] || { echo "install: $var=${!var}: an absolute path of letters, digits and ._/+- please" >&2; exit 2; }
done

reload_systemd() {
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || true
  fi
  command -v journalctl >/dev/null && journalctl --update-catalog 2>/dev/null || true
}

install_all() {
  if [ ! -x "$PREFIX/bin/python" ]; then
    log "creating $PREFIX"
    /usr/bin/python3 -m venv --system-site-packages "$PREFIX"
  fi
  "$PREFIX/bin/pip" install -q --upgrade pip >&2
  "$PREFIX/bin/pip" install -q . >&2                               # with its dependencies
  "$PREFIX/bin/pip" install -q --force-reinstall --no-deps . >&2   # even when the version is unchanged
  install -d "$BINDIR" "$UNITDIR" "$CATALOGDIR" "$PREFIX/share"
  ln -sfn "$PREFIX/bin/tailcalld" "$BINDIR/tailcalld"
  ln -sfn "$PREFIX/bin/tailcallctl" "$BINDIR/tailcallctl"
  install_units
  install -m 0644 contrib/tailcalld.catalog "$CATALOGDIR/tailcalld.catalog"
  install -d -m 0755 "$CONFDIR"
  if [ ! -e "$CONFDIR/tailcalld.toml" ]; then
    install -m 0644 "$DEFAULT_CONF" "$CONFDIR/tailcalld.toml"
  elif ! cmp -s "$CONFDIR/tailcalld.toml" "$DEFAULT_CONF"; then
    log "keeping $CONFDIR/tailcalld.toml (edited); the new default is $CONFDIR/tailcalld.toml.new"
    install -m 0644 "$DEFAULT_CONF" "$CONFDIR/tailcalld.toml.new"
  fi
  install -m 0644 "$DEFAULT_CONF" "$PRISTINE"
  reload_systemd
  log "installed: systemctl enable --now tailcalld.socket (or start tailcalld)"
}

# contrib/tailcalld.service is a template: its @PREFIX@ and @CONFDIR@ become this install's.
install_units() {
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@CONFDIR@|$CONFDIR|g" contrib/tailcalld.service >"$UNITDIR/tailcalld.service.tmp"
  chmod 0644 "$UNITDIR/tailcalld.service.tmp"
  mv -f "$UNITDIR/tailcalld.service.tmp" "$UNITDIR/tailcalld.service"
  install -m 0644 contrib/tailcalld.socket "$UNITDIR/"
}

# The catalog alone, for a checkout: replaced (and the database rebuilt) only when it changed.
install_catalog() {
  if ! cmp -s contrib/tailcalld.catalog "$CATALOGDIR/tailcalld.catalog"; then
    install -d "$CATALOGDIR"
    install -m 0644 contrib/tailcalld.catalog "$CATALOGDIR/tailcalld.catalog"
    command -v journalctl >/dev/null && journalctl --update-catalog 2>/dev/null || true
    log "journal catalog installed: $CATALOGDIR/tailcalld.catalog"
  fi
}

uninstall_all() {
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl disable --now tailcalld.socket tailcalld.service 2>/dev/null || true
  fi
  rm -f "$UNITDIR/tailcalld.service" "$UNITDIR/tailcalld.socket" "$CATALOGDIR/tailcalld.catalog"
  rm -f "$CONFDIR/tailcalld.toml.new"
  if [ -f "$CONFDIR/tailcalld.toml" ] && [ -f "$PRISTINE" ] && cmp -s "$CONFDIR/tailcalld.toml" "$PRISTINE"; then
    rm -f "$CONFDIR/tailcalld.toml"
  elif [ -f "$CONFDIR/tailcalld.toml" ]; then
    log "keeping $CONFDIR/tailcalld.toml (edited)"
  fi
  rmdir "$CONFDIR" 2>/dev/null || true
  for b in tailcalld tailcallctl; do
    [ "$(readlink "$BINDIR/$b" 2>/dev/null)" = "$PREFIX/bin/$b" ] && rm -f "$BINDIR/$b"
  done
  rm -rf "$PREFIX"
  reload_systemd
  log "uninstalled; pins under /sys/fs/bpf are left as they are"
}

case "${1:-install}" in
  install) install_all ;;
  uninstall) uninstall_all ;;
  catalog) install_catalog ;;
  *) echo "usage: $0 install|uninstall|catalog" >&2; exit 2 ;;
esac
