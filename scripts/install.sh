#!/usr/bin/env bash
# make install / make uninstall: tailcalld as a system service.
#
#   /opt/tailcalld                    PREFIX: a venv of its own (made from /usr/bin/python3 with
#                                     --system-site-packages, so it sees python3-bpfcc)
#   /usr/local/bin/tailcalld|ctl      BINDIR: symlinks into that venv
#   /etc/systemd/system/tailcalld.{service,socket}   UNITDIR; the service runs PREFIX/bin/tailcalld
#                                     with CONFDIR's config (contrib/'s, with those two put in)
#   /usr/lib/systemd/catalog/tailcalld.catalog   CATALOGDIR (journalctl -x explanations)
#   /etc/tailcalld/tailcalld.toml     CONFDIR: from config/, never overwriting an edited one
#
# Uninstall (with the same variables) removes all of that but CONFDIR/tailcalld.toml when it
# was edited, and never touches the pins under /sys/fs/bpf (tracing stays as it is; see README).
#
# `install.sh catalog` installs the catalog alone (make setup runs it: journalctl -x explains
# the entries of a daemon run from a checkout too).
#
# DESTDIR stages the install for a package: every file goes below DESTDIR, named for where it
# will live (the unit's ExecStart, the links in BINDIR and the venv's scripts name PREFIX, not
# DESTDIR/PREFIX), and nothing on this machine is touched: no systemctl, no catalog database
# (the package's postinst runs `journalctl --update-catalog`), no root needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/opt/tailcalld}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CATALOGDIR=${CATALOGDIR:-/usr/lib/systemd/catalog}
CONFDIR=${CONFDIR:-/etc/tailcalld}
DESTDIR=${DESTDIR:-}
DEFAULT_CONF=config/tailcalld.toml

log() { echo "install: $*" >&2; }
DESTDIR=${DESTDIR%/}  # DESTDIR=/ is no staging
[ -n "$DESTDIR" ] || [ "$(id -u)" = 0 ] || { echo "install: must run as root (or stage with DESTDIR=)" >&2; exit 1; }

# The unit names these paths: absolute, and nothing systemd would read as a specifier (%),
# a quote or a word break, nor sed as its own syntax.
for var in PREFIX CONFDIR ${DESTDIR:+DESTDIR}; do
  [[ ${!var} =~ ^/[A-Za-z0-9._/+-]*$ ]] || { echo "install: $var=${!var}: an absolute path of letters, digits and ._/+- please" >&2; exit 2; }
done
# Where the files are written (below DESTDIR when staging); PREFIX, BINDIR... name where they live.
D_PREFIX=$DESTDIR$PREFIX D_BINDIR=$DESTDIR$BINDIR D_UNITDIR=$DESTDIR$UNITDIR
D_CATALOGDIR=$DESTDIR$CATALOGDIR D_CONFDIR=$DESTDIR$CONFDIR
PRISTINE="$D_PREFIX/share/tailcalld.toml.default"  # what we installed, to tell an edited config

reload_systemd() {
  [ -z "$DESTDIR" ] || return 0  # a staged tree is not this machine's
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || true
  fi
  command -v journalctl >/dev/null && journalctl --update-catalog 2>/dev/null || true
}

install_all() {
  if [ ! -x "$D_PREFIX/bin/python" ]; then
    log "creating $D_PREFIX"
    /usr/bin/python3 -m venv --system-site-packages "$D_PREFIX"
  fi
  "$D_PREFIX/bin/python" -m pip install -q --upgrade pip >&2
  "$D_PREFIX/bin/python" -m pip install -q . >&2                               # with its dependencies
  "$D_PREFIX/bin/python" -m pip install -q --force-reinstall --no-deps . >&2   # even when the version is unchanged
  relocate_venv
  install -d "$D_BINDIR" "$D_UNITDIR" "$D_CATALOGDIR" "$D_PREFIX/share"
  ln -sfn "$PREFIX/bin/tailcalld" "$D_BINDIR/tailcalld"
  ln -sfn "$PREFIX/bin/tailcallctl" "$D_BINDIR/tailcallctl"
  install_units
  install -m 0644 contrib/tailcalld.catalog "$D_CATALOGDIR/tailcalld.catalog"
  install -d -m 0755 "$D_CONFDIR"
  if [ ! -e "$D_CONFDIR/tailcalld.toml" ]; then
    install -m 0644 "$DEFAULT_CONF" "$D_CONFDIR/tailcalld.toml"
  elif ! cmp -s "$D_CONFDIR/tailcalld.toml" "$DEFAULT_CONF"; then
    log "keeping $D_CONFDIR/tailcalld.toml (edited); the new default is $D_CONFDIR/tailcalld.toml.new"
    install -m 0644 "$DEFAULT_CONF" "$D_CONFDIR/tailcalld.toml.new"
  fi
  install -m 0644 "$DEFAULT_CONF" "$PRISTINE"
  reload_systemd
  if [ -n "$DESTDIR" ]; then
    log "staged in $DESTDIR: the service runs $PREFIX/bin/tailcalld --config $CONFDIR/tailcalld.toml"
  else
    log "installed: systemctl enable --now tailcalld.socket (or start tailcalld)"
  fi
}

# A venv names its folder in its scripts (pip's shebangs, activate) and its compiled modules
# (the file names tracebacks show); staged, that is DESTDIR/PREFIX, and they must name PREFIX,
# where the package puts the tree.  (Its python is a link to /usr/bin/python3.)
relocate_venv() {
  [ -n "$DESTDIR" ] || return 0
  local staged=${D_PREFIX//./\\.}  # a sed pattern: the dots literal (the rest is checked above)
  grep -rlIF -- "$D_PREFIX" "$D_PREFIX/bin" "$D_PREFIX/pyvenv.cfg" | xargs -r sed -i "s|$staged|$PREFIX|g"
  "$D_PREFIX/bin/python" -m compileall -q -f -s "$DESTDIR" -p / "$D_PREFIX/lib" >/dev/null
}

# contrib/tailcalld.service runs the default PREFIX and CONFDIR (so that it is a unit as it is,
# which systemd-analyze can check); its ExecStart= gets this install's.
install_units() {
  sed -e "/^ExecStart=/s|^ExecStart=/opt/tailcalld/|ExecStart=$PREFIX/|" \
      -e "/^ExecStart=/s| --config /etc/tailcalld/| --config $CONFDIR/|" \
      contrib/tailcalld.service >"$D_UNITDIR/tailcalld.service.tmp"
  grep -qxF "ExecStart=$PREFIX/bin/tailcalld --config $CONFDIR/tailcalld.toml" "$D_UNITDIR/tailcalld.service.tmp" \
    || { echo "install: contrib/tailcalld.service's ExecStart= is not the one install.sh renders" >&2; exit 1; }
  chmod 0644 "$D_UNITDIR/tailcalld.service.tmp"
  mv -f "$D_UNITDIR/tailcalld.service.tmp" "$D_UNITDIR/tailcalld.service"
  install -m 0644 contrib/tailcalld.socket "$D_UNITDIR/"
}

# The catalog alone, for a checkout: the file replaced when it changed, and the database
# rebuilt every time (50 ms), so that a database lost or built without it heals too.
install_catalog() {
  if ! cmp -s contrib/tailcalld.catalog "$D_CATALOGDIR/tailcalld.catalog"; then
    install -d "$D_CATALOGDIR"
    install -m 0644 contrib/tailcalld.catalog "$D_CATALOGDIR/tailcalld.catalog"
    log "journal catalog installed: $D_CATALOGDIR/tailcalld.catalog"
  fi
  if [ -z "$DESTDIR" ] && command -v journalctl >/dev/null; then
    journalctl --update-catalog || log "WARNING: journalctl --update-catalog failed; journalctl -x will not explain tailcalld's entries"
  fi
}

uninstall_all() {
  if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl disable --now tailcalld.socket tailcalld.service 2>/dev/null || true
  fi
  rm -f "$D_UNITDIR/tailcalld.service" "$D_UNITDIR/tailcalld.socket" "$D_CATALOGDIR/tailcalld.catalog"
  rm -f "$D_CONFDIR/tailcalld.toml.new"
  if [ -f "$D_CONFDIR/tailcalld.toml" ] && [ -f "$PRISTINE" ] && cmp -s "$D_CONFDIR/tailcalld.toml" "$PRISTINE"; then
    rm -f "$D_CONFDIR/tailcalld.toml"
  elif [ -f "$D_CONFDIR/tailcalld.toml" ]; then
    log "keeping $D_CONFDIR/tailcalld.toml (edited)"
  fi
  rmdir "$D_CONFDIR" 2>/dev/null || true
  for b in tailcalld tailcallctl; do
    [ "$(readlink "$D_BINDIR/$b" 2>/dev/null)" = "$PREFIX/bin/$b" ] && rm -f "$D_BINDIR/$b"
  done
  rm -rf "$D_PREFIX"
  reload_systemd
  log "uninstalled; pins under /sys/fs/bpf are left as they are"
}

case "${1:-install}" in
  install) install_all ;;
  uninstall) uninstall_all ;;
  catalog) install_catalog ;;
  *) echo "usage: $0 install|uninstall|catalog" >&2; exit 2 ;;
esac
