#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels the GPU machine lacks for bench/gpu.sh, into .whl/.
#
# The GPU machine has Python 3.12 with torch 2.11 (CUDA), transformers, peft, accelerate and most of
# the scientific stack, but no LLaMA-Factory and no network. We carry LLaMA-Factory's training-time
# dependencies that its image lacks, transformers at the version this project is tested with, and this
# plugin's own wheel. gradio, av, modelscope and the web UI's server stack stay behind (training does
# not import them), which keeps the carried tree under the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip wheel -q --no-deps -w .whl .
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl \
  llamafactory==0.9.5 transformers==5.6.0 datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 trl==0.24.0 \
  fire==0.7.1 termcolor==3.3.0 omegaconf==2.4.0 tyro==0.8.14 docstring-parser==0.18.0 shtab==1.13.0 \
  pydantic==2.12.3 pydantic-core==2.41.4 annotated-types==0.8.0 typing-inspection==0.4.5 torchdata==0.11.0 \
  tokenizers==0.22.2 accelerate==1.11.0 peft==0.18.1 fsspec==2025.3.0 ruamel.yaml==0.19.1
# bitsandbytes for the QLoRA benchmark (gpu.sh qlora): its wheel carries a library per CUDA and ROCm release (43 MB);
# keep the CPU one and CUDA 13's, which the image's torch (cu130) loads, so that .whl stays under the carry limit
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl bitsandbytes==0.50.2
"$PY" - .whl/bitsandbytes-*.whl <<'SLIM'
import re, sys, zipfile
from pathlib import Path
wheel = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
dropped = lambda name: "libbitsandbytes_" in name and not keep.search(name)
with zipfile.ZipFile(wheel) as src:
    items = [(info, src.read(info)) for info in src.infolist() if not dropped(info.filename)]
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not dropped(line.split(b",")[0].decode()))
        out.writestr(info, data)
SLIM
du -sh .whl && ls .whl
