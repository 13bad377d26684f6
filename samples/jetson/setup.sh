#!/usr/bin/env bash
# On a Jetson Orin (JetPack 6): set up the runtime, build TensorRT engines here from an exported ONNX bundle,
# try them once, and optionally install the web sample as a systemd service. See samples/jetson/README.md.
#
#   bash samples/jetson/setup.sh --dry-run                   # print every command, run none (works anywhere)
#   bash samples/jetson/setup.sh                             # the reference bundle, Orin Nano limits
#   bash samples/jetson/setup.sh --bundle engines/sd-model-512x512-b1-fp16-onnxruntime --preset jetson-orin-nx --service
#
# Safe to run again: the venv and packages are kept, the engines are rebuilt only with --force.
set -euo pipefail

usage() {
  cat <<EOF
usage: bash samples/jetson/setup.sh [options]

  --bundle DIR      ONNX bundle exported on a workstation (default: $BUNDLE)
  --preset NAME     TensorRT builder limits: jetson-orin-nano (1024 MiB workspace) or jetson-orin-nx (2048 MiB)
                    (default: $PRESET)
  --out DIR         TensorRT bundle to write (default: the ONNX bundle's name, -onnxruntime -> -tensorrt)
  --force           rebuild the engines even if the TensorRT bundle exists
  --skip-install    do not create .venv or install packages
  --service         install and start the web sample as a systemd service (ldm-web.service)
  --host ADDR       the service's listening address (default: $HOST; 0.0.0.0 opens it to the network, with no login)
  --port N          the service's port (default: $PORT)
  --user NAME       the user the service runs as (default: $RUN_AS)
  --dry-run         print the commands instead of running them
  -h, --help        this text
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

cd "$(dirname "$0")/../.."
REPO=$(pwd)
BUNDLE=engines/shapes-ldm-64x64-b1-fp16-onnxruntime
PRESET=jetson-orin-nano
OUT=""
FORCE=0
INSTALL=1
SERVICE=0
HOST=127.0.0.1
PORT=8000
RUN_AS=${SUDO_USER:-$(id -un)}
DRY_RUN=0
UNIT_NAME=ldm-web.service

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=${2:?--bundle needs a folder}; shift ;;
    --preset) PRESET=${2:?--preset needs a name}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --force) FORCE=1 ;;
    --skip-install) INSTALL=0 ;;
    --service) SERVICE=1 ;;
    --host) HOST=${2:?--host needs an address}; shift ;;
    --port) PORT=${2:?--port needs a number}; shift ;;
    --user) RUN_AS=${2:?--user needs a name}; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

# The presets `python -m export.build --device-preset` knows for a Jetson (export/tensorrt/builder.py: PRESETS).
case "$PRESET" in
  jetson-orin-nano | jetson-orin-nx) ;;
  *) die "--preset $PRESET: choose jetson-orin-nano or jetson-orin-nx" ;;
esac
case "$PORT" in
  '' | *[!0-9]*) die "--port $PORT is not a number" ;;
esac
BUNDLE=${BUNDLE%/}
OUT=${OUT:-$(dirname "$BUNDLE")/$(basename "${BUNDLE%-onnxruntime}")-tensorrt}
case "$OUT" in
  /*) OUT_ABS=$OUT ;;
  *) OUT_ABS=$REPO/$OUT ;;
esac
PY=$REPO/.venv/bin/python
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)

# Run a command, or with --dry-run print it (quoted, so it can be pasted).
run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# --- checks: say what is wrong before changing anything -------------------------------------------------------
if [ "$DRY_RUN" -eq 0 ]; then
  [ -f /etc/nv_tegra_release ] || echo "warning: this does not look like a Jetson (no /etc/nv_tegra_release); going on" >&2
  [ -f "$BUNDLE/manifest.json" ] || die "no ONNX bundle at $BUNDLE: export it on a workstation with \`python -m export.build --backend onnxruntime\` and copy the folder here"
  python3 -c "import tensorrt" 2>/dev/null || die "TensorRT's Python package is missing: install JetPack's python3-libnvinfer (sudo apt-get install python3-libnvinfer)"
elif [ ! -f "$BUNDLE/manifest.json" ]; then
  echo "note: no ONNX bundle at $BUNDLE yet (a real run needs one)" >&2
fi

# --- 1. the runtime, in a venv that sees JetPack's TensorRT -----------------------------------------------------
# --system-site-packages: TensorRT comes with JetPack as a system package, not from PyPI. No torch: the
# runtime needs numpy, tokenizers and Pillow; --from-onnx builds need onnx; the verification runs ONNX Runtime.
if [ "$INSTALL" -eq 1 ]; then
  [ -x "$PY" ] || run python3 -m venv --system-site-packages "$REPO/.venv"
  run "$PY" -m pip install -q --upgrade pip
  run "$PY" -m pip install -q -e "$REPO" "cuda-python>=12.6" onnx onnxruntime
fi

# --- 2. TensorRT engines, built here: engines only run on the GPU and TensorRT version that built them ----------
if [ -d "$OUT" ] && [ "$FORCE" -eq 0 ]; then
  echo "keeping $OUT (built before; --force rebuilds it)"
else
  force_flag=()
  [ "$FORCE" -eq 1 ] && force_flag=(--force)
  run "$PY" -m export.build --from-onnx "$BUNDLE" --device-preset "$PRESET" --out "$OUT" "${force_flag[@]}"
fi

# --- 3. one image through the engines, as a check ---------------------------------------------------------------
run "$PY" "$REPO/samples/minimal.py" --bundle "$OUT" --out "$REPO/out/samples/jetson"

# --- 4. the web sample as a service (systemd starts it at boot and restarts it if it fails) ---------------------
if [ "$SERVICE" -eq 1 ]; then
  unit=$(sed -e "s|@REPO@|$REPO|g" -e "s|@USER@|$RUN_AS|g" -e "s|@BUNDLE@|$OUT_ABS|g" \
    -e "s|@HOST@|$HOST|g" -e "s|@PORT@|$PORT|g" "$REPO/samples/jetson/$UNIT_NAME")
  if [ "$DRY_RUN" -eq 1 ]; then
    echo "+ write /etc/systemd/system/$UNIT_NAME:"
    printf '%s\n' "$unit" | sed 's/^/    /'
  else
    printf '%s\n' "$unit" | "${SUDO[@]}" tee "/etc/systemd/system/$UNIT_NAME" >/dev/null
  fi
  run "${SUDO[@]}" systemctl daemon-reload
  run "${SUDO[@]}" systemctl enable --now "$UNIT_NAME"
  echo "the page: http://$HOST:$PORT/ (logs: journalctl -u $UNIT_NAME -f)"
fi
