#!/usr/bin/env bash
# The system packages a make target needs, and nothing else: the one place they are named.
#
#   scripts/system_deps.sh venv   python3's venv module (Debian and Ubuntu ship it apart from python3)
#   scripts/system_deps.sh test   what `make test` needs: a C compiler and the Python and ALSA headers
#                                 (pyalsaaudio has no wheel; the tests build an ALSA plugin), ALSA's
#                                 plugins and utilities (virtual devices), systemd's analyzers (unit
#                                 files), Chromium (the HTML report renders in a test)
#
# `make demo` needs none of the test packages. As root on Debian or Ubuntu the missing packages are
# installed with apt-get (quietly); otherwise one line names them and the command, and the exit is 1.
set -euo pipefail

case "${1:-}" in
    venv) packages=(python3-venv) ;;
    test) packages=(gcc python3-dev libasound2-dev libasound2-plugins alsa-utils systemd chromium fonts-dejavu-core) ;;
    *) echo "usage: $0 venv|test" >&2; exit 2 ;;
esac

missing=()
if [ "$1" = venv ]; then
    # The module, not the package, is what matters (a python3 built from source has it).
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing=("${packages[@]}")
elif command -v dpkg-query >/dev/null; then
    for pkg in "${packages[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = "install ok installed" ] || missing+=("$pkg")
    done
else
    # Not Debian-based: we cannot check by package name; name them once and let make try.
    echo "system_deps: not a Debian-based system; make sure these (or your distribution's equivalents) are installed: ${packages[*]}" >&2
    exit 0
fi

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "system_deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        echo "system_deps: apt-get install ${missing[*]} failed (above)" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    exit 0
fi

echo "system_deps: missing system packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
exit 1
