#!/usr/bin/env bash
# vendor/rustls-webpki is rustls-webpki as published on crates.io (src/, Cargo.toml, LICENSE)
# with vendor/rustls-webpki.patch applied; VENDORED.md beside them is the broker's own note.
# This script is the only way the folder changes (vendor/rustls-webpki/VENDORED.md):
#
#   vendor/rebuild-webpki.sh --check   fail when the folder differs from crate + patch (.ci/run)
#   vendor/rebuild-webpki.sh           rewrite the folder from crate + patch
#   vendor/rebuild-webpki.sh --diff    rewrite the patch from the folder, after editing it
#   vendor/rebuild-webpki.sh --unit-tests   run the folder's subject_name unit tests (.ci/run)
#
# The crate comes from Cargo's download cache when it is there, else from static.crates.io,
# and must have the sha256 below (the "cksum" of Cargo's index, https://index.crates.io/ru/st/rustls-webpki).
set -euo pipefail
cd "$(dirname "$0")"

VERSION=0.103.17
SHA256=e3a0760a887c14823fca5a1c970b01d47c328c696c0c64829d1df50e8f853fd5
URL="https://static.crates.io/crates/rustls-webpki/rustls-webpki-$VERSION.crate"
FOLDER=rustls-webpki
PATCH=rustls-webpki.patch
# The published files the folder holds (the crate also has README.md, Cargo.lock, ...).
KEEP=(src Cargo.toml LICENSE)

mode=${1:-rebuild}
case "$mode" in
--check | --diff | rebuild) ;;
--unit-tests)
    # The published crate cannot run its own unit tests: they include files of upstream's
    # tests/ folder, which is not published, and its dev-dependencies. So: a copy of the
    # folder as a crate of its own (no crypto provider, no dev-dependencies), every module's
    # test code but subject_name's compiled out, and the subject_name tests (the patch's
    # and upstream's) run. Offline: it needs only untrusted and rustls-pki-types, which
    # the broker's build has fetched.
    copy="${CARGO_TARGET_DIR:-$PWD/../target}/webpki-unit-tests"
    rm -rf "$copy/src"
    mkdir -p "$copy"
    cp -R "$FOLDER/src" "$copy/"
    find "$copy/src" -name '*.rs' -not -path '*/subject_name/*' -exec \
        sed -E -i 's/#\[cfg\((test|all\(test[^]]*\))\)\]/#[cfg(any())]/' {} +
    cat >"$copy/Cargo.toml" <<'TOML'
[package]
name = "webpki-unit-tests"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[lib]
name = "webpki"
path = "src/lib.rs"

[dependencies]
pki-types = { package = "rustls-pki-types", version = "1.12", default-features = false }
untrusted = "0.9"

[features]
default = ["std"]
alloc = ["pki-types/alloc"]
std = ["alloc", "pki-types/std"]
ring = []
aws-lc-rs = []
aws-lc-rs-fips = []
aws-lc-rs-unstable = []

[lints.rust.unexpected_cfgs]
level = "warn"
check-cfg = ["cfg(webpki_docsrs)"]
TOML
    cd "$copy"
    CARGO_TARGET_DIR="$copy/target" cargo test --offline --quiet --lib subject_name
    exit 0
    ;;
*)
    echo "usage: $0 [--check | --diff | --unit-tests]" >&2
    exit 2
    ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

crate=""
for cached in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"rustls-webpki-$VERSION.crate"; do
    if [ -f "$cached" ] && echo "$SHA256  $cached" | sha256sum --check --status; then
        crate=$cached
        break
    fi
done
if [ -z "$crate" ]; then
    crate="$work/rustls-webpki-$VERSION.crate"
    curl --silent --show-error --fail --location --retry 3 --output "$crate" "$URL"
fi
if ! echo "$SHA256  $crate" | sha256sum --check --status; then
    echo "$crate: sha256 is $(sha256sum "$crate" | cut -d' ' -f1), expected $SHA256" >&2
    exit 1
fi

# a/: the published crate's files; b/: the folder's (to write the patch) or a/ patched.
tar -xzf "$crate" -C "$work"
mkdir "$work/a" "$work/b"
for item in "${KEEP[@]}"; do
    cp -R "$work/rustls-webpki-$VERSION/$item" "$work/a/"
done

if [ "$mode" = --diff ]; then
    for item in "${KEEP[@]}"; do
        cp -R "$FOLDER/$item" "$work/b/"
    done
    unexpected=$(cd "$FOLDER" && ls -A | grep -v -x -e VENDORED.md "${KEEP[@]/#/-e}" || true)
    if [ -n "$unexpected" ]; then
        echo "$FOLDER holds files the patch cannot carry: $unexpected" >&2
        exit 1
    fi
    # No timestamps and a/ b/ prefixes: the patch changes only when the folder does.
    (cd "$work" && git diff --no-index --no-color --no-ext-diff --src-prefix= --dst-prefix= a b) >"$PATCH.new" || true
    mv "$PATCH.new" "$PATCH"
    echo "wrote vendor/$PATCH ($(grep -c '^diff --git' "$PATCH") files)"
    exit 0
fi

cp -R "$work/a/." "$work/b/"
# git apply outside a repository (the temporary folder) applies the patch as patch(1) would.
if ! (cd "$work/b" && git apply --whitespace=nowarn) <"$PATCH"; then
    echo "vendor/$PATCH does not apply to rustls-webpki $VERSION" >&2
    exit 1
fi

if [ "$mode" = --check ]; then
    if ! diff -r --exclude=VENDORED.md "$work/b" "$FOLDER" >"$work/differences"; then
        cat "$work/differences" >&2
        echo "vendor/$FOLDER differs from rustls-webpki $VERSION + vendor/$PATCH (above);" \
            "edit the folder, then vendor/rebuild-webpki.sh --diff" >&2
        exit 1
    fi
    echo "vendor/$FOLDER is rustls-webpki $VERSION + vendor/$PATCH"
    exit 0
fi

for item in "${KEEP[@]}"; do
    rm -rf "${FOLDER:?}/$item"
    cp -R "$work/b/$item" "$FOLDER/"
done
echo "rebuilt vendor/$FOLDER from rustls-webpki $VERSION + vendor/$PATCH"
