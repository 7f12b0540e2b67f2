#!/usr/bin/env bash
# Issue 19's device checks on a lent GPU machine, in one call (docs/reproducing-the-paper.md, "On a GPU"):
#
#   bash tools/gpu_check.sh --fetch        # here, once: the wheels of tools/gpu_wheels.txt into .whl/ (~19 MB)
#   then the device tool: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# The machine's image has torch, but not open_clip, papermill or the Jupyter kernel: they travel as wheels
# (tools/gpu_wheels.txt) and install into /tmp/site. Written to $OUT (default /tmp/gpu-check):
#   environment.txt     nvidia-smi, torch and CUDA versions
#   doctor-MS2MA.json   `muva doctor --protocol MS2MA --json`: environment and the measured estimate (3 steps of each
#                       stage at the config's batch, extrapolated to the published MSMT17 / Market-1501 sizes)
#   as-shipped.log      tests/test_paper_configs.py::test_ms2ma_as_shipped_with_vit_b16 on cuda: configs/MS2MA.yaml
#                       as shipped (ViT-B/16 at 256x128, batch 64, float16 autocast + GradScaler, the authors' masks)
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch" ]]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r <(grep -v '^#' tools/gpu_wheels.txt)
fi
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: the wheels in .whl/ did not install: they are for CPython 3.12 on x86-64, the lent" \
              "machines' python3 (this one: $(python3 --version 2>&1)); without .whl/, bash tools/gpu_check.sh --fetch" \
              "first"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PATH="/tmp/site/bin:$PATH"
{ date -u; nvidia-smi; python3 -c "import torch, open_clip, papermill; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0), 'open_clip',
open_clip.__version__, 'papermill', papermill.__version__)"; } > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
timeout 180 python3 -m muva_core.cli doctor --protocol MS2MA --json -p device=cuda > "$OUT/doctor-MS2MA.json" \
    2> "$OUT/doctor.err"
echo "doctor: exit $? ($(wc -c < "$OUT/doctor-MS2MA.json") bytes)"
MUVA_TEST_DEVICE=cuda timeout 330 python3 -m pytest -q -s -p no:cacheprovider \
    "tests/test_paper_configs.py::test_ms2ma_as_shipped_with_vit_b16" 2>&1 | tee "$OUT/as-shipped.log" | tail -40
