#!/usr/bin/env bash
# Builds livestick's packages from the checked-out tree:
#   - a .deb (dpkg-deb from a staged tree: the binary, the man page, bash/zsh/fish
#     completions, the livecd-iso-to-disk link), Depends taken from the tool
#     registry (`livestick doctor --json`);
#   - an RPM with rpmbuild from packaging/livestick.spec, offline: the crates are
#     vendored first (`cargo vendor`, which needs only the crates registry) and
#     the build itself runs with --offline.
# Output in target/packages/ (or $OUT).
#
# Usage: packaging/build.sh [--deb] [--rpm] [--smoke]
#   no --deb/--rpm: both; --smoke: install the .deb with dpkg -i (root) and try it,
#   and the RPMs with rpm -i --nodeps into a scratch root.
#   packaging/build.sh --control ARCH   prints the DEBIAN/control it would write.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

name=livestick
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb_revision=1
out=${OUT:-$repo/target/packages}

want_deb=0 want_rpm=0 smoke=0 control_arch=
while (($#)); do
  case $1 in
    --deb) want_deb=1 ;;
    --rpm) want_rpm=1 ;;
    --smoke) smoke=1 ;;
    --control) control_arch=${2:?--control needs a Debian architecture}; shift ;;
    *) echo "packaging/build.sh: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done
if ((!want_deb && !want_rpm)) && [[ -z $control_arch ]]; then
  want_deb=1 want_rpm=1
fi

# The Debian package fields from the tool registry, as doctor reports it:
# what a plain `write` needs is Depends, the other features' packages are
# Recommends, and what only the test suite runs ("(optional)") is Suggests.
# SYSLINUX exists for x86 only: elsewhere sticks boot through UEFI alone.
debian_relations() {
  local doctor_json=$1 arch=$2
  python3 - "$doctor_json" "$arch" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
arch = sys.argv[2]
x86 = arch in ("amd64", "i386")
depends, recommends, suggests = [], [], []
for c in report["checks"]:
    pkg = c["debian"]
    if not x86 and pkg.startswith("syslinux"):
        continue
    # Services are not packages to depend on; the boot tests' QEMU and
    # firmware are the test suite's, not the tool's.
    if c["kind"] == "service" or c["feature"].startswith("boot tests"):
        continue
    if c["required"]:
        bucket = depends
    elif "(optional)" in c["feature"]:
        bucket = suggests
    else:
        bucket = recommends
    if pkg not in depends + recommends + suggests:
        bucket.append(pkg)
print("Depends: " + ", ".join(depends))
print("Recommends: " + ", ".join(recommends))
print("Suggests: " + ", ".join(suggests))
EOF
}

control_file() {
  local doctor_json=$1 arch=$2
  cat <<EOF
Package: $name
Version: $version-$deb_revision
Section: admin
Priority: optional
Architecture: $arch
Maintainer: livestick developers <livestick@users.noreply.github.com>
$(debian_relations "$doctor_json" "$arch")
Provides: livecd-iso-to-disk
Homepage: https://github.com/livestick/livestick
Description: write live ISOs to USB sticks with persistence, in user space
 livestick writes Fedora-style live ISOs to USB sticks or image files with a
 persistent overlay, home and swap, and maintains those sticks (overlay
 status, merge, reset, recover, grow) without mounting anything or needing
 root for image files. It also answers to livecd-iso-to-disk's command line.
EOF
}

release_binary() {
  if [[ ! -x $repo/target/release/$name || -n ${REBUILD:-} ]]; then
    CARGO_TARGET_DIR=$repo/target cargo build --release --locked
  fi
  echo "$repo/target/release/$name"
}

if [[ -n $control_arch ]]; then
  bin=${LIVESTICK:-$(release_binary)}
  json=$(mktemp)
  trap 'rm -f "$json"' EXIT
  "$bin" doctor --json > "$json"
  control_file "$json" "$control_arch"
  exit 0
fi

mkdir -p "$out"

build_deb() {
  local bin arch stage deb
  bin=$(release_binary)
  arch=$(dpkg --print-architecture)
  stage=$(mktemp -d)
  # The package's root directory becomes /'s entry: 0755, not mktemp's 0700.
  chmod 0755 "$stage"
  # Stripped: the release profile keeps line tables for backtraces (50 MB).
  install -Dm0755 -s "$bin" "$stage/usr/bin/$name"
  ln -s "$name" "$stage/usr/bin/livecd-iso-to-disk"
  install -d "$stage/usr/share/man/man1"
  "$bin" man | gzip -9n > "$stage/usr/share/man/man1/$name.1.gz"
  ln -s "$name.1.gz" "$stage/usr/share/man/man1/livecd-iso-to-disk.1.gz"
  install -d "$stage/usr/share/bash-completion/completions" \
    "$stage/usr/share/zsh/vendor-completions" "$stage/usr/share/fish/vendor_completions.d"
  "$bin" completions bash > "$stage/usr/share/bash-completion/completions/$name"
  "$bin" completions zsh > "$stage/usr/share/zsh/vendor-completions/_$name"
  "$bin" completions fish > "$stage/usr/share/fish/vendor_completions.d/$name.fish"
  install -Dm0644 LICENSE "$stage/usr/share/doc/$name/copyright"
  for doc in README.md docs/compatibility.md docs/exit-codes.md docs/install.md docs/json.md docs/json-maintenance.md docs/ndjson-events.md; do
    gzip -9nc "$doc" > "$stage/usr/share/doc/$name/$(basename "$doc").gz"
  done
  install -d "$stage/DEBIAN"
  "$bin" doctor --json > "$stage/doctor.json"
  control_file "$stage/doctor.json" "$arch" > "$stage/DEBIAN/control"
  rm "$stage/doctor.json"
  echo "Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)" >> "$stage/DEBIAN/control"
  deb=$out/${name}_${version}-${deb_revision}_${arch}.deb
  dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
  rm -rf "$stage"
  echo "$deb"
}

build_rpm() {
  local top src
  command -v rpmbuild >/dev/null || {
    echo "rpmbuild is missing: apt-get install rpm (Debian) or dnf install rpm-build" >&2
    return 1
  }
  top=$(mktemp -d)
  mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
  src=$top/src/$name-$version
  mkdir -p "$src"
  # The committed tree (plus uncommitted changes to tracked files): what a
  # release tarball holds, without target/ or fixtures/out/.
  # (tar keeps the symbolic links the tree tracks as links.)
  git ls-files -z | tar --null -T - -cf - | tar -x -C "$src"
  (cd "$src" && cargo vendor --locked --quiet vendor > /dev/null)
  tar -C "$src" -czf "$top/SOURCES/$name-$version-vendor.tar.gz" vendor
  rm -rf "$src/vendor"
  tar -C "$top/src" -czf "$top/SOURCES/$name-$version.tar.gz" "$name-$version"
  cp packaging/livestick.spec "$top/SPECS/"
  # --nodeps: the BuildRequires name Fedora packages; on Debian the toolchain
  # comes from rustup or apt, not from the rpm database. No network from here on.
  CARGO_NET_OFFLINE=true rpmbuild -bb --nodeps \
    --define "_topdir $top" \
    --define "debug_package %{nil}" \
    "$top/SPECS/livestick.spec" > "$top/rpmbuild.log" 2>&1 || {
      tail -40 "$top/rpmbuild.log" >&2
      echo "rpmbuild failed; its tree is kept in $top" >&2
      return 1
    }
  find "$top/RPMS" -name '*.rpm' -exec cp -t "$out" {} +
  find "$top/RPMS" -name '*.rpm' -printf "$out/%f\n"
  rm -rf "$top"
}

smoke_test_deb() {
  local deb=$1
  dpkg -i "$deb"
  livestick --version | grep -q "^livestick $version"
  livecd-iso-to-disk --help | grep -q "livecd-iso-to-disk compatibility mode"
  [[ $(readlink -f /usr/bin/livecd-iso-to-disk) == /usr/bin/livestick ]]
  # man-db finds the page when the system keeps man pages (minimal images
  # exclude /usr/share/man); the page inside the package is read either way.
  if command -v man >/dev/null && [[ -e /usr/share/man/man1/livestick.1.gz ]]; then
    [[ $(man -w livestick) == /usr/share/man/man1/livestick.1.gz ]]
  fi
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/man/man1/livestick.1.gz \
    | zcat | grep -q 'LIVESTICK WRITE'
  bash -n /usr/share/bash-completion/completions/livestick
  echo "smoke test of $deb: passed"
}

# Debian has no dnf to resolve an RPM's Requires, so the RPMs are installed with
# --nodeps into a scratch rpm database and root: what they install, its paths, the
# compatibility link and the binary itself are tried there.
smoke_test_rpms() {
  local root
  root=$(mktemp -d)
  rpm --root "$root" --initdb
  rpm --root "$root" -i --nodeps --noscripts "$@"
  rpm --root "$root" -q livestick livestick-compat >/dev/null
  "$root/usr/bin/livestick" --version | grep -q "^livestick $version"
  [[ $(readlink "$root/usr/bin/livecd-iso-to-disk") == *livestick ]]
  # Fedora's rpmbuild compresses man pages, Debian's does not.
  zcat -f "$root"/usr/share/man/man1/livestick.1* | grep -q 'LIVESTICK WRITE'
  rm -rf "$root"
  echo "smoke test of $*: passed"
}

if ((want_deb)); then
  deb=$(build_deb)
  echo "built $deb"
  ((smoke)) && smoke_test_deb "$deb"
fi
if ((want_rpm)); then
  rpms=$(build_rpm)
  for rpm in $rpms; do
    echo "built $rpm"
  done
  # shellcheck disable=SC2086 # one word per package file
  ((smoke)) && smoke_test_rpms $rpms
fi
