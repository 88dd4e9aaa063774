#!/usr/bin/env bash
# Build mailerd_<version>_<arch>.deb from this checkout with Debian's own tools (dpkg-deb).
#
#   bash packaging/build-deb.sh [--version V] [--output DIR] [--lintian]
#
# The application goes into a self-contained virtual environment at /opt/mailerd made
# from /usr/bin/python3 (an interpreter under /root or /home would be hidden from the
# service by ProtectHome=). Its dependencies come from PyPI as wheels, built once per
# dependency list and kept in $MAILERD_DEB_CACHE (default build/deb-cache); mailerd's own
# wheel is built every time from a clean copy of the checkout's files, so nothing is
# written into the checkout and no stale build/lib file ends up in the package.
# Needs: dpkg-deb, python3-venv, python3-dev, gcc, pkg-config, libsystemd-dev, binutils
# (scripts/setup.sh installs them); lintian for --lintian.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEB_DIR=$ROOT/packaging/deb
PYTHON=/usr/bin/python3
VERSION=""
OUTPUT=$ROOT/build
RUN_LINTIAN=0

die() { echo "build-deb: $*" >&2; exit 2; }

while (($#)); do
    case $1 in
        --version) VERSION=${2:?--version needs a value}; shift 2 ;;
        --output) OUTPUT=${2:?--output needs a directory}; shift 2 ;;
        --lintian) RUN_LINTIAN=1; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

for tool in dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install dpkg"
done
[[ -x $PYTHON ]] || die "$PYTHON is missing: apt-get install python3 python3-venv"

pyproject() { "$PYTHON" -c "import sys, tomllib; p = tomllib.load(open(sys.argv[1], 'rb'))['project']; $1" "$ROOT/pyproject.toml"; }
PROJECT_VERSION=$(pyproject 'print(p["version"])')
VERSION=${VERSION:-$PROJECT_VERSION}
ARCH=$(dpkg --print-architecture)
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYNEXT=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
# reproducible: file times, changelog date and .pyc files from the last commit's time
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}

CACHE=${MAILERD_DEB_CACHE:-$ROOT/build/deb-cache}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/root
VENV=/opt/mailerd
mkdir -p "$CACHE" "$OUTPUT" "$STAGE"

# ---- wheels: the dependencies (cached by interpreter and dependency list), then mailerd
BUILDER=$CACHE/builder-py$PYVER
if [[ ! -x $BUILDER/bin/pip ]]; then
    "$PYTHON" -m venv "$BUILDER"
    "$BUILDER/bin/python" -m pip install -q --upgrade pip wheel setuptools
fi
pyproject 'print("\n".join(p["dependencies"]))' > "$WORK/requirements.txt"
DEPS_KEY=$( (echo "$PYVER $ARCH"; cat "$WORK/requirements.txt") | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$DEPS_KEY
if [[ ! -e $WHEELS/.complete ]]; then
    rm -rf "$WHEELS"
    # --no-cache-dir: a wheel pip once built from source with another interpreter (one
    # under /root, say) carries that interpreter's paths; build them here from /usr/bin/python3
    "$BUILDER/bin/python" -m pip wheel -q --no-cache-dir --wheel-dir "$WHEELS" \
        -r "$WORK/requirements.txt"
    touch "$WHEELS/.complete"
fi
mkdir "$WORK/src" "$WORK/project"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 -r cp --parents -t "$WORK/src" 2>/dev/null || true)
[[ -f $WORK/src/pyproject.toml ]] || die "could not copy the checkout's files"
quietly() { "$@" >"$WORK/log" 2>&1 || { cat "$WORK/log" >&2; die "failed: $*"; }; }
quietly "$BUILDER/bin/python" -m pip wheel -q --no-deps --wheel-dir "$WORK/project" "$WORK/src"

# ---- the venv, laid out in the staging root exactly as it will sit at /opt/mailerd
# (no pip inside: the builder's pip installs into it)
"$PYTHON" -m venv --without-pip "$STAGE$VENV"
"$BUILDER/bin/python" -m pip --python "$STAGE$VENV/bin/python" install -q --no-index --no-compile \
    --find-links "$WHEELS" --find-links "$WORK/project" "mailerd==$PROJECT_VERSION"
# the dependencies' own command-line tools are not mailerd's to ship
find "$STAGE$VENV/bin" -type f ! -name mailerd ! -name mailerctl -delete
rm -rf "$STAGE$VENV/include"
# debug symbols and notes of the wheels' extensions: a third of their size, no use here
find "$STAGE$VENV/lib" -name '*.so' -exec strip --strip-unneeded --remove-section=.comment \
    --remove-section=.note {} +
# wheels that bundle their C libraries (psycopg_binary.libs/libpq.so.5...) ship them 0755;
# Debian's policy is 0644 for shared libraries (lintian: shared-library-is-executable)
find "$STAGE$VENV/lib" -type f -name '*.so*' -exec chmod 0644 {} +
# console scripts (#! line) and pyvenv.cfg were written with the staging path
sed -i "s|$STAGE$VENV|$VENV|g" "$STAGE$VENV"/bin/mailerd "$STAGE$VENV"/bin/mailerctl \
    "$STAGE$VENV/pyvenv.cfg"
# /opt is read-only for the service (ProtectSystem=strict): ship the bytecode, with the
# installed paths in it; checked-hash .pyc files stay valid whatever dpkg does to mtimes
"$STAGE$VENV/bin/python" -m compileall -q -j 0 -s "$STAGE" -p / \
    --invalidation-mode checked-hash "$STAGE$VENV/lib" >/dev/null
if leftover=$(grep -rl --binary-files=text "$STAGE" "$STAGE$VENV" | head -3) && [[ -n $leftover ]]; then
    die "the staging path is still inside: $leftover"
fi

# ---- commands, units, sysusers/tmpfiles, config, docs
install -d "$STAGE/usr/bin" "$STAGE/lib/systemd/system/mailerd.service.d" \
    "$STAGE/usr/lib/mailerd" "$STAGE/usr/lib/sysusers.d" "$STAGE/usr/lib/tmpfiles.d" \
    "$STAGE/etc/mailerd" "$STAGE/usr/share/doc/mailerd" "$STAGE/usr/share/lintian/overrides"
ln -s "$VENV/bin/mailerd" "$STAGE/usr/bin/mailerd"
ln -s "$VENV/bin/mailerctl" "$STAGE/usr/bin/mailerctl"
ln -s "$VENV/bin/mailerd-unsubscribe" "$STAGE/usr/bin/mailerd-unsubscribe"
install -m 644 "$ROOT/packaging/mailerd.service" "$ROOT/packaging/mailerd.socket" \
    "$ROOT/packaging/mailerd-unsubscribe.service" "$STAGE/lib/systemd/system/"
install -m 644 "$DEB_DIR/relay-named.conf" "$STAGE/lib/systemd/system/mailerd.service.d/"
install -m 755 "$DEB_DIR/relay-named" "$STAGE/usr/lib/mailerd/relay-named"
install -m 644 "$ROOT/packaging/mailerd.sysusers.conf" "$STAGE/usr/lib/sysusers.d/mailerd.conf"
install -m 644 "$ROOT/packaging/mailerd.tmpfiles.conf" "$STAGE/usr/lib/tmpfiles.d/mailerd.conf"
install -m 644 "$ROOT/packaging/mailerd.toml" "$STAGE/etc/mailerd/mailerd.toml"
install -m 644 "$DEB_DIR/copyright" "$STAGE/usr/share/doc/mailerd/copyright"
install -m 644 "$ROOT/packaging/nginx-unsubscribe.conf" "$STAGE/usr/share/doc/mailerd/"
install -d "$STAGE/usr/share/man/man1" "$STAGE/usr/share/man/man8" \
    "$STAGE/usr/share/bash-completion/completions" "$STAGE/usr/share/zsh/vendor-completions"
gzip -9n < "$ROOT/packaging/man/mailerctl.1" > "$STAGE/usr/share/man/man1/mailerctl.1.gz"
gzip -9n < "$ROOT/packaging/man/mailerd.8" > "$STAGE/usr/share/man/man8/mailerd.8.gz"
install -m 644 "$ROOT/packaging/completion/mailerctl.bash" \
    "$STAGE/usr/share/bash-completion/completions/mailerctl"
install -m 644 "$ROOT/packaging/completion/_mailerctl" "$STAGE/usr/share/zsh/vendor-completions/_mailerctl"
install -m 644 "$DEB_DIR/lintian-overrides" "$STAGE/usr/share/lintian/overrides/mailerd"
gzip -9n < "$ROOT/README.md" > "$STAGE/usr/share/doc/mailerd/README.md.gz"
{
    echo "mailerd ($VERSION) unstable; urgency=medium"
    echo
    echo "  * Built from mailerd $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "$PROJECT_VERSION")."
    echo
    echo " -- mailerd developers <dev@mailerd.invalid>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$STAGE/usr/share/doc/mailerd/changelog.gz"

# ---- DEBIAN/
install -d "$STAGE/DEBIAN"
install -m 755 "$DEB_DIR/postinst" "$DEB_DIR/prerm" "$DEB_DIR/postrm" "$STAGE/DEBIAN/"
echo /etc/mailerd/mailerd.toml > "$STAGE/DEBIAN/conffiles"
DEPENDS="python3 (>= $PYVER), python3 (<< $PYNEXT), libc6 (>= 2.34), libsystemd0, systemd (>= 247)"
sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@DEPENDS@|$DEPENDS|" \
    -e "s|@INSTALLED_SIZE@|$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)|" \
    "$DEB_DIR/control.in" > "$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum | grep -v '  etc/' > DEBIAN/md5sums)

find "$STAGE" -exec touch --no-dereference -d "@$SOURCE_DATE_EPOCH" {} +
DEB=$OUTPUT/mailerd_${VERSION}_${ARCH}.deb
dpkg-deb --build -Zxz -z1 --root-owner-group "$STAGE" "$DEB" >/dev/null
echo "$DEB"

if ((RUN_LINTIAN)); then
    command -v lintian >/dev/null || die "lintian is missing: apt-get install lintian"
    lintian --fail-on error,warning "$DEB" >&2
fi
