#!/usr/bin/env bash
# The device check of a session lent a GPU, prepared so that it is one call: `make gpu-test`'s
# tests (every `gpu`-marked test), then the GPU benchmarks, all output under $OUT.
#
#   here:   bash bench/gpu_session.sh prepare
#           (wheels of what the device image lacks, for its Python 3.12, into .whl/; the real
#           data the tests read into .gpu-data/; both git-excluded, about 40 MiB)
#   there:  run(command="bash bench/gpu_session.sh run", carry=[".whl", ".gpu-data"], timeout_s=600)
#   here:   bash bench/gpu_session.sh run        # the same on the CPU: the gpu tests skip, the
#                                                # benchmarks print their CPU rows (a dry run)
#
# The device image (see /work/.library/device/KINDS.md) has python3 3.12 with CUDA torch, numpy,
# numba, scipy, scikit-image, tifffile, pillow, hypothesis, pytest and safetensors; it cannot
# reach a package index, so the rest travels as wheels pinned to this checkout's versions.
set -euo pipefail
cd "$(dirname "$0")/.."

# name==version as this checkout's environment has them (dependencies the image lacks)
WHEELS=(
    dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0
    tornado==6.6.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    openslide-python==1.4.7 openslide-bin==4.0.1.2 tiffslide==3.0.1 imagecodecs==2026.3.6
    simplejpeg==1.9.0
)
GPU_TESTS=(
    tests/integration/test_stainnet.py tests/integration/test_pipeline.py
    tests/unit/test_stain_vahadane.py tests/unit/test_augment.py tests/unit/test_labnorm.py
)

prepare() {
    for ignored in /.whl/ /.gpu-data/; do
        grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
    done
    rm -rf .whl .gpu-data
    local platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
             manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    local data="${WSI_NORM_DATA:-../shared/data}"
    mkdir -p .gpu-data/slides .gpu-data/he .gpu-data/stainnet
    cp "$data/slides/CMU-1-Small-Region.svs" .gpu-data/slides/
    cp "$data"/he/torchstain-*.png .gpu-data/he/
    cp "$data"/stainnet/* .gpu-data/stainnet/
    [ -f "$data/MANIFEST.md" ] && cp "$data/MANIFEST.md" .gpu-data/
    du -sh .whl .gpu-data
}

run() {
    local out="${OUT:-/tmp/gpu-session}"
    mkdir -p "$out"
    local py=python3
    if [ -x .venv/bin/python ]; then  # this checkout's own environment (the dry run here)
        py=.venv/bin/python
    elif ! python3 -c "import dask, openslide, simplejpeg" 2>/dev/null; then  # the device image
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [ -d .gpu-data ]; then export WSI_NORM_DATA="$PWD/.gpu-data"; fi
    export PYTHONUNBUFFERED=1
    { nvidia-smi || echo "no nvidia-smi"; } > "$out/nvidia-smi.txt" 2>&1
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$out/torch.txt"
    set +e
    timeout 240 "$py" -m pytest -q -m gpu -p no:cacheprovider -rs "${GPU_TESTS[@]}" 2>&1 | tee "$out/gpu-test.log"
    local tests=${PIPESTATUS[0]}
    timeout 90 "$py" bench/bench_augment.py --batches 6 --batch 32 --json "$out/augment.json" 2>&1 \
        | tee "$out/augment.log"
    local device=cpu
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && device=cuda
    timeout 90 "$py" bench/bench_stainnet.py --device "$device" --batch 64 2>&1 | tee "$out/stainnet.log"
    set -e
    echo "gpu tests exit status: $tests"
    return "$tests"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
