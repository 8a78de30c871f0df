#!/usr/bin/env bash
# Builds the Debian package and checks it as installed: unpacks it into a
# scratch root, checks that every file is in its place, runs the installed
# binary's `check` on the installed config, and verifies the installed unit.
# CI runs it after the tests (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
bash packaging/build-deb.sh --quiet
deb=$(ls -t target/debian/linkgate_*.deb | head -1)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
for file in usr/bin/linkgate etc/linkgate/linkgate.toml usr/lib/systemd/system/linkgate.service \
    usr/share/man/man1/linkgate.1.gz usr/share/bash-completion/completions/linkgate \
    usr/share/zsh/vendor-completions/_linkgate usr/share/fish/vendor_completions.d/linkgate.fish \
    usr/share/doc/linkgate/README.md usr/share/doc/linkgate/copyright; do
  [ -s "$root/$file" ] || { echo "package lacks $file"; exit 1; }
done
dpkg-deb -f "$deb" Depends | grep -q adduser
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/linkgate/linkgate.toml
"$root/usr/bin/linkgate" check -c "$root/etc/linkgate/linkgate.toml"
zcat "$root/usr/share/man/man1/linkgate.1.gz" | grep -q '^\.TH linkgate 1'
if command -v systemd-analyze >/dev/null; then
  sed "s|/usr/bin/linkgate|$root/usr/bin/linkgate|g" "$root/usr/lib/systemd/system/linkgate.service" \
    > "$root/linkgate.service"
  systemd-analyze verify "$root/linkgate.service"
fi
if command -v lintian >/dev/null; then
  # Errors and warnings fail; deliberate deviations are in
  # packaging/debian/lintian-overrides (installed with the package).
  lintian --fail-on error,warning "$deb" || { echo "lintian found problems"; exit 1; }
fi
# In CI's throwaway container (LINKGATE_DEB_INSTALL=1, as root): install it
# for real, so that the maintainer script runs, then purge it.
if [ "${LINKGATE_DEB_INSTALL:-}" = 1 ]; then
  dpkg -i "$deb"
  getent passwd linkgate >/dev/null || { echo "postinst made no linkgate user"; exit 1; }
  [ "$(stat -c %G /etc/linkgate/linkgate.toml)" = linkgate ] || { echo "config not in group linkgate"; exit 1; }
  [ "$(stat -c %U:%a /var/lib/linkgate)" = linkgate:700 ] || { echo "no private state directory"; exit 1; }
  /usr/bin/linkgate check -c /etc/linkgate/linkgate.toml
  dpkg --purge linkgate
  [ ! -e /usr/bin/linkgate ] && [ ! -e /etc/linkgate/linkgate.toml ] && [ ! -e /var/lib/linkgate ] \
    || { echo "purge left files"; exit 1; }
fi
echo "package ok: $deb ($(dpkg-deb -c "$deb" | wc -l) entries)"
