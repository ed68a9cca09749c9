#!/usr/bin/env bash
# Set up a virtual environment in .venv with the package installed (editable).
# A torch that the base interpreter already has (e.g. a CUDA build) is reused, never replaced;
# with none, torch==2.13.0 is installed (a local CPU wheel where pip's find-links has one).
# Usage: scripts/setup.sh [--hf] [--test]
#   (none)  the package and its dependencies (the `landscape` command, the demo, every built-in analysis)
#   --hf    also the hf extra: transformers, for Hugging Face models (landscape.from_pretrained,
#           scripts/train_hf_gpt2.py), with torch pinned to the installed version
#   --test  also pytest, the hf extra (the tests use it) and, where apt is available, headless Chromium
set -euo pipefail
hf=0; test=0
for arg in "$@"; do
    case "$arg" in
        --hf) hf=1 ;;
        --test) test=1; hf=1 ;;  # the tests use transformers (the hf extra)
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown option '$arg'; use --hf and/or --test" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0" >&2
    "$VPY" -m pip install -q "torch==2.13.0"
fi
extras=""
if [ "$test" = 1 ]; then extras="[test,hf]"; elif [ "$hf" = 1 ]; then extras="[hf]"; fi
# torch stays the version already installed: the hf extra (transformers) must not upgrade it
pin=$(mktemp)
"$VPY" -c "import torch; print('torch==' + torch.__version__)" >"$pin"
# reuse the venv's setuptools for the editable build when it has one (fast, offline); else pip isolates it
iso=""
if "$VPY" -c "import setuptools" >/dev/null 2>&1; then iso="--no-build-isolation"; fi
log=$(mktemp)
if ! "$VPY" -m pip install -q $iso -c "$pin" -e ".${extras}" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log" "$pin"; echo "setup: pip install failed" >&2; exit 1
fi
rm -f "$log"
"$VPY" -c "import torch, sys; sys.exit(0 if 'torch==' + torch.__version__ == open('$pin').read().strip() else 1)" \
    || { echo "setup: torch changed during install (expected $(cat "$pin"))" >&2; rm -f "$pin"; exit 1; }
rm -f "$pin"
"$VPY" -c "import nexus_opt, landscape, cli" || { echo "setup: package import failed" >&2; exit 1; }
if [ "$test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    # Headless Chromium renders the demo report in the tests; best effort where apt is available.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "setup: could not install chromium; the browser test will be skipped" >&2
    fi
fi
echo "setup: ready (.venv)" >&2
