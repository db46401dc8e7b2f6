#!/usr/bin/env bash
# The wheels kdcache needs on a GPU machine that has PyTorch (torch, torchvision, timm, numpy, pillow, click, tqdm,
# safetensors, fsspec, huggingface_hub, regex, pyyaml, matplotlib, tensorboard) but no internet: open_clip, zarr 3,
# numcodecs, webdataset and what they need beyond that. Downloaded here for that machine's Python and platform, then
# carried there and installed by bench/gpu_device.sh.
#
#     bash bench/gpu_wheels.sh .whl            # Python 3.12, x86-64 manylinux (PY=3.11 for another Python)
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The versions this checkout is tested with (setup.cfg gives the ranges it accepts).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" --implementation cp \
  "${platforms[@]}" -d "$dest" \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
  webdataset==1.0.2 braceexpand==0.1.7
du -sh "$dest"
