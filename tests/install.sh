#!/bin/sh
# tests/install.sh — installs libkeel into a temporary DESTDIR, then builds
# and runs an outside program with nothing but `pkg-config keel`: once
# against the shared library, once with libkeel.a linked in beside it (as
# the README says), and once with only libkeel.a installed.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=/opt/keel-test
root="$tmp/root"
CC=${CC:-cc}

make -C "$top" --no-print-directory -s install DESTDIR="$root" PREFIX="$prefix" >/dev/null
libdir="$root$prefix/lib"
grep -qx "prefix=$prefix" "$libdir/pkgconfig/keel.pc" ||
    { echo "install: keel.pc does not name the install prefix $prefix" >&2; exit 1; }
cp "$top/tests/consumer/consumer.c" "$tmp/"
cd "$tmp"
pc() { PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config --define-variable=prefix="$root$prefix" "$@" keel; }

# Shared.
$CC -std=c11 -Wall -Werror consumer.c $(pc --cflags --libs) -o shared
LD_LIBRARY_PATH="$libdir" ./shared
LD_LIBRARY_PATH="$libdir" ldd ./shared | grep -q "libkeel.so.[0-9]* => $libdir/" ||
    { echo "install: shared consumer does not use the installed libkeel.so" >&2; exit 1; }

# Static: --static brings the private deps; with the .so installed too the
# archive must be named, or the linker takes the .so.
$CC -std=c11 -Wall -Werror consumer.c $(pc --static --cflags --libs | sed 's/-lkeel\>/-l:libkeel.a/') -o static
./static
rm -f "$libdir"/libkeel.so*
$CC -std=c11 -Wall -Werror consumer.c $(pc --static --cflags --libs) -o static2
./static2
for p in static static2; do
    if ldd ./$p | grep -q libkeel; then
        echo "install: static consumer $p still needs libkeel.so" >&2
        exit 1
    fi
done

# Headers, man pages and their links are where the GNU variables say.
for f in include/keel.h include/keel/common.h include/keel/pool.h share/man/man7/keel.7 \
         share/man/man3/keel_pool.3 share/man/man3/keel_pool_acquire.3; do
    [ -f "$root$prefix/$f" ] || { echo "install: $prefix/$f missing" >&2; exit 1; }
done
make -C "$top" --no-print-directory -s uninstall DESTDIR="$root" PREFIX="$prefix" >/dev/null
left=$(find "$root" -type f | head -5)
[ -z "$left" ] || { echo "install: uninstall left files behind: $left" >&2; exit 1; }
echo "check-install: shared and static consumers built with pkg-config and ran"
