#!/usr/bin/env bash
# The wheels the GPU machine (Python 3.12, torch 2.11 + CUDA 13, no internet) lacks, into the ignored .whl/, for
# scripts/gpu_check.sh to install there with --no-index --no-deps. Everything else the package imports (torch,
# torchvision, numpy, pillow, h5py, mpi4py, httpx, anyio, h11, click, regex, timm, huggingface_hub, safetensors,
# pyarrow, tqdm, annotated-doc) is in that machine's image: /work/.library/device/KINDS.md.
# Versions are the ones this project's venv runs its tests with. faiss-gpu is not here: its CUDA wheel is far over
# the 60 MiB the device tool carries, so the IVF k-means runs there through torch (clip_hpc/index/gpu_train.py).
# mpich is not here either: the check runs one rank, and mpi4py is imported only under an MPI launcher.
#
#   scripts/gpu_wheels.sh            (PYTHON=python3.11 by default: any pip can download for another Python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4          # the model (regex, timm, hf hub are there)
  faiss-cpu==1.15.1                                          # the index (the GPU trains its k-means via torch)
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 python-multipart==0.0.34
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  opentelemetry-api==1.45.2                                  # fastapi >= 0.16x imports it unconditionally
  typing_extensions==4.16.0                                  # pydantic 2.14 needs >= 4.16 (the image's may be older)
)
PLATFORMS=()
for n in 2_28 2_27 2_24 2_17 2_5; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl
rm -f .whl/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls .whl/*.whl | wc -l | xargs echo "wheels:"
du -sh .whl | cut -f1 | xargs echo "size:"
total=$(du -sb .whl | cut -f1)
if (( total > 60 * 1024 * 1024 )); then echo "gpu_wheels: .whl is $total bytes, over 60 MiB" >&2; exit 1; fi
