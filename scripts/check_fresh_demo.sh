#!/usr/bin/env bash
# `make demo` on a fresh clone needs nothing but python3 and make: prove it.
#
# Clones the committed tree into a temporary folder and runs `make demo` there in a private mount
# namespace where /usr/include/alsa is an empty folder, so a demo path that tried to build
# pyalsaaudio (or anything else needing the ALSA headers) would fail. Then checks the reply was
# written and that the demo's venv holds no alsaaudio, torch or Model Optimizer. Needs root for
# the mount namespace (CI is).
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

git clone -q "$repo" "$work/clone"
if [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null; then
    unshare -m bash -euc "mkdir -p /usr/include/alsa && mount -t tmpfs none /usr/include/alsa && \
        test ! -e /usr/include/alsa/asoundlib.h && make -C '$work/clone' demo"
else
    echo "check_fresh_demo: not root (or no mount namespaces): running without hiding the ALSA headers" >&2
    make -C "$work/clone" demo
fi
test -s "$work/clone/out/reply.wav" || { echo "check_fresh_demo: no reply.wav" >&2; exit 1; }
test -s "$work/clone/out/transcript.txt" || { echo "check_fresh_demo: no transcript" >&2; exit 1; }
if "$work/clone/.venv/bin/python" -c "import alsaaudio" 2>/dev/null; then
    echo "check_fresh_demo: the demo venv installed pyalsaaudio: the demo must not need ALSA" >&2
    exit 1
fi
for module in torch modelopt; do
    if "$work/clone/.venv/bin/python" -c "import $module" 2>/dev/null; then
        echo "check_fresh_demo: the demo venv installed $module: the demo must not need it" >&2
        exit 1
    fi
done
echo "check_fresh_demo: make demo passed on a fresh clone without the ALSA headers"
