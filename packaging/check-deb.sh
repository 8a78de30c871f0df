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
echo "package ok: $deb ($(dpkg-deb -c "$deb" | wc -l) entries)"
