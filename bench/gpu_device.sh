#!/usr/bin/env bash
# Run bench/gpu_check.py on a GPU machine with PyTorch but no internet, from a copy of this checkout and the wheels
# bench/gpu_wheels.sh downloaded (installed into a folder of their own; kdcache runs from the checkout). Arguments go
# to gpu_check.py; the results land where its --out says.
#
#     bash bench/gpu_device.sh --only-decode --out results/gpu_decode.json     # part 3's bare forward + part 4
#     WHEELS=.whl PYTHON=python3 bash bench/gpu_device.sh --out results/gpu_check.json   # everything
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=${SITE:-/tmp/kdcache-site}
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${WHEELS:-.whl}"/*.whl
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c "import torch, torchvision, open_clip, zarr, webdataset, kdcache
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__,
      'zarr', zarr.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
exec "$py" bench/gpu_check.py "$@"
