#!/usr/bin/env bash
# Build the MONAI Label environment for serving medkd bundles (see docs/monai_label.md).
#
#   tools/monai_label/install_env.sh [VENV]        (default VENV: .venv-label; PYTHON picks the interpreter)
#
# MONAI Label 0.8.5 needs torchvision, numpy<2, jsonschema<4 and pydicom<3, so it gets its own virtual
# environment; the project's .venv stays free of torchvision. Steps:
#   1. torch + torchvision as a matching pair (TORCH_SPEC / TORCHVISION_SPEC); pip's own configuration is used, so
#      wheels lying in a local wheel folder or index are taken from there;
#   2. a constraints file that keeps exactly that torch/torchvision in every later resolve;
#   3. the sam2 wheel (a hard dependency of monailabel, sdist-only on PyPI) built against the installed torch
#      without CUDA and without an isolated build env (which would pull a second multi-GB torch);
#   4. monailabel with the pins that keep its DICOM stack importable;
#   5. medkd itself, editable and with --no-deps: everything it imports at inference/training time is already
#      there (monai[fire,ignite,itk,nibabel,tensorboard,tqdm,pillow], scipy, einops, pydicom), and nothing may
#      replace the environment's torch or numpy.
# Re-running it on an existing environment only re-checks the pins (pip answers "already satisfied").
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-label}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.29.1}"
MONAILABEL_SPEC="${MONAILABEL_SPEC:-monailabel==0.8.5}"
SAM2_SPEC="${SAM2_SPEC:-sam2==1.1.0}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --no-input)
# pip, minus its warnings about index folders of this machine's pip configuration that lack a package
pip_() { "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

# 1) torch + torchvision
pip_ install --quiet "$TORCH_SPEC" "$TORCHVISION_SPEC"
# 2) pin them for every later step
printf '%s\n%s\n' "$TORCH_SPEC" "$TORCHVISION_SPEC" > "$WORK/constraints.txt"
# 3) sam2, built here against that torch (CPU only)
export SAM2_BUILD_CUDA=0
pip_ wheel --quiet --no-deps --no-build-isolation "$SAM2_SPEC" -w "$WORK/wheels"
# 4) MONAI Label
pip_ install --quiet -c "$WORK/constraints.txt" --find-links "$WORK/wheels" \
    "$MONAILABEL_SPEC" "pydicom<3" "dicomweb-client<0.60" "pynetdicom<3"
# 5) medkd, without letting pip touch the dependencies above
pip_ install --quiet --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import monai, monailabel, numpy, torch, torchvision
from torchvision.ops import nms  # fails when torch and torchvision do not match
import monailabel.interfaces.app  # noqa: F401
import medkd, medkd.data, medkd.distill, medkd.engines, medkd.networks  # noqa: F401
print(f"MONAI Label env ready: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"monai {monai.__version__}, monailabel {monailabel.__version__}, numpy {numpy.__version__}, medkd {medkd.__version__}")
PY
