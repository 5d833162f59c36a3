#!/usr/bin/env bash
# The declared lower bounds hold: a fresh venv with the oldest release of every direct dependency that
# pyproject.toml admits (.ci/lower-bounds.txt) runs a fast subset of the suite (models, configs, Stage-1, export).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWER_BOUNDS_VENV:-/tmp/roadwork-lower-bounds}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r .ci/lower-bounds.txt \
    'pytest>=8' 'pytest-timeout>=2.3' 'jsonschema>=4'
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
"$VENV/bin/python" -m pip list --format=freeze | grep -iE '^(torch|pytorch-lightning|timm|transformers|peft|albumentations|hydra-core|torchmetrics|onnxscript)='
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_config.py tests/test_config_checks.py \
    tests/test_models.py tests/test_transforms.py tests/test_metrics.py tests/test_calibration.py \
    tests/test_stage1.py tests/test_export.py tests/test_pretrain.py
