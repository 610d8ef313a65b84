#!/usr/bin/env bash
# The multi-GPU measurements of issues 4 and 5, one section per device command (each stays under the device tool's
# 10-minute limit; compiling SDXL takes ~100 s for the plain UNet, ~200 s for the patch step, on H200s).
#
#   bash benchmarks/gpu_session.sh SECTION        # on a 2 x H200 machine, from the repository root
#
# SECTION: patch1024 | patch2048 | async-sdxl | async-sd21 | smoke (tiny models, ~1 min: run it first)
#          | emulate1024 | emulate2048 | profile1024 (one GPU: patch_bench --emulate-ranks 2, patch_profile.py)
#          | patch-code1024 (one GPU: the compiled stale step's generated code, packed)
#          | vae-emulated (one GPU: vae_bench.py, SDXL VAE fp16 at 2048 and 4096 px, serial vs rank 0 of 2 and 4)
#          | async-emulated (one GPU: async_bench.py --emulate-ranks 2, SDXL 1024: each component's compiled step,
#            peak memory and bytes per step vs the whole compiled model; estimated 5-8 min)
#          | serve1024 (one GPU: `paradiff serve` of a random-weight SDXL, 1024 px, 30 steps, compiled, 1 rank:
#            overhead vs the bare call, throughput, p50/p99; benchmarks/serve_bench.py, about 6-8 min; needs the
#            fastapi/uvicorn/pydantic wheels too) | serve-tiny (its CPU-sized smoke, tiny SDXL, no compile)
# (The before/after check of the execution core on one GPU is benchmarks/core_regression.sh, not a section here.)
# Logs and results go to $OUT (the device tool's output folder), or ./gpu-out when $OUT is unset; copy the
# results into benchmarks/results/ afterwards. diffusers is not on the device image: carry the wheels made by
# ../shared/tools/device-wheels.sh in .whl/ (this script installs them into .site/).
set -euo pipefail
section=${1:?usage: gpu_session.sh patch1024|patch2048|async-sdxl|async-sd21|smoke|emulate1024|emulate2048|profile1024|patch-code1024|vae-emulated|async-emulated|serve1024|serve-tiny}
out=${OUT:-gpu-out}
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import diffusers, fastapi, uvicorn" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
fi
export PYTHONUNBUFFERED=1
# Ranks compile their steps side by side; one that finishes first waits in its first collective for the other, so
# the 45 s default collective timeout (paradiff.runtime) is too short for compiling SDXL.
export PARADIFF_TIMEOUT=${PARADIFF_TIMEOUT:-900}
export PYTHONPATH=$PWD/.site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } \
  | tee "$out/env.txt"
run() {  # run NAME COMMAND...: a time limit per step (LIMIT s, default 560) so one hang cannot take the whole call
  local name=$1; shift
  echo "== $name (limit ${LIMIT:-560} s): $*" | tee -a "$out/commands.txt"
  timeout "${LIMIT:-560}" "$@" 2>&1 | tee "$out/$name.log" || echo "== $name exited with ${PIPESTATUS[0]}" | tee -a "$out/commands.txt"
}
case $section in
  smoke)
    run patch-tiny torchrun --nproc-per-node 2 benchmarks/patch_bench.py --tiny --steps 8 --out "$out/patch-tiny"
    run async-tiny torchrun --nproc-per-node 2 benchmarks/async_bench.py --tiny --out "$out/async-tiny" ;;
  patch1024)  # every configuration's figures are written as soon as it ends; patch and nocomm give exposed comm
    run patch-sdxl1024 torchrun --nproc-per-node 2 benchmarks/patch_bench.py \
      --configs baseline,patch,patch-nocomm,patch-graph --out "$out/patch-sdxl1024-h200x2" ;;
  emulate1024)  # one GPU: rank 0 of 2 with local copies for collectives (compute bound, compile time, capture)
    run patch-sdxl1024-emulated python3 benchmarks/patch_bench.py --emulate-ranks 2 \
      --configs baseline,patch-graph,patch,cfg --out "$out/patch-sdxl1024-emulated2" ;;
  emulate2048)
    run patch-sdxl2048-emulated python3 benchmarks/patch_bench.py --emulate-ranks 2 --size 2048 --steps 30 \
      --configs baseline,patch --out "$out/patch-sdxl2048-emulated2" ;;
  profile1024)  # one GPU: kernel time by kind, whole UNet vs one rank's rows vs the hooked step (~6 min),
                # + the eager split by hooked kind of layer (--by-layer)
    run patch-profile-sdxl1024 python3 benchmarks/patch_profile.py --by-layer --out "$out/patch-profile-sdxl1024" ;;
  patch-code1024)  # one GPU: inductor's generated code of the emulated stale step (what each hook costs after
                   # fusion: is the halo cat fused into its producer, is the whole-image K/V written once), packed;
                   # TINY=1: a CPU smoke of the section (tiny UNet, inductor on the CPU)
    export TORCHINDUCTOR_CACHE_DIR="$out/inductor"
    run patch-code-sdxl1024 python3 benchmarks/patch_bench.py --emulate-ranks 2 --configs patch --steps 8 \
      --repeat 1 ${TINY:+--tiny --compile-backend inductor} --out "$out/patch-code-sdxl1024"
    (cd "$out" && find inductor -name '*.py' -size +8k | tar czf patch-code-sdxl1024.tgz -T -) && rm -rf "$out/inductor"
    ls -la "$out/patch-code-sdxl1024.tgz" ;;
  vae-emulated)  # one GPU: per-rank peak memory and time of the patch-parallel VAE decode (estimated 2-4 min)
    run vae-sdxl-emulated python3 benchmarks/vae_bench.py --sizes 2048,4096 --ranks 2,4 \
      --out "$out/vae-sdxl-emulated" ;;
  async-emulated)
    run async-sdxl-emulated python3 benchmarks/async_bench.py --emulate-ranks 2 --arch sdxl --repeats 2 \
      --out "$out/async-sdxl-emulated2" ;;
  serve1024)  # one GPU, one command: build + save SDXL (~1 min), compile + warm-up (2-4 min), load, bare call
    LIMIT=${LIMIT:-530} run serve-sdxl1024 python3 benchmarks/serve_bench.py --size 1024 --steps 30 --budget 500 \
      --out "$out/serve-sdxl1024-h200" ;;
  serve-tiny)
    run serve-tiny python3 benchmarks/serve_bench.py --tiny --out "$out/serve-tiny" ;;
  patch2048)
    run patch-sdxl2048 torchrun --nproc-per-node 2 benchmarks/patch_bench.py --size 2048 --steps 30 \
      --configs baseline,patch --out "$out/patch-sdxl2048-h200x2" ;;
  async-sdxl)
    run async-sdxl torchrun --nproc-per-node 2 benchmarks/async_bench.py --arch sdxl --out "$out/async-sdxl-h200x2" ;;
  async-sd21)
    run async-sd21 torchrun --nproc-per-node 2 benchmarks/async_bench.py --arch sd21 --out "$out/async-sd21-h200x2" ;;
  *) echo "unknown section $section" >&2; exit 2 ;;
esac
