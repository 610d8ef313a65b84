#!/usr/bin/env bash
# Before/after check of the execution core ("One execution core", Done when): StreamPipeline compiled fps, the
# emulated patch stale step and the CFG step, two source trees measured in one device command, side by side.
#
#   bash benchmarks/core_regression.sh TREE_BEFORE TREE_AFTER SECTION [--rounds N ...]   # from the repository root
#
# SECTION: stream | patch | cfg (one nvidia-h200 device command each) | all (with CORE_SMOKE=1 only)
# TREE_*: folders with src/paradiff (each tree is imported from its own src/; the driver and its helpers are this
# tree's benchmarks/core_regression.py, patch_bench.py and stream_bench.py: see core_regression.py's docstring).
#
# Preparation, once, here in the repository root (the 'before' tree: commit 2c12c57, the last landed commit; its
# reference models are left out, nothing here reads them, and with them the upload would pass 64 MiB):
#   mkdir -p .before && git archive 2c12c57 src benchmarks | tar -x -C .before --exclude='*/reference/models/*'
#   echo /.before/ >> "$(git rev-parse --git-path info/exclude)"      # = .git/info/exclude in the main checkout
#   ../shared/tools/device-wheels.sh                                  # diffusers wheels into .whl/ (~4 MiB)
# Device command (carry [".whl", ".before"]; AFTER_LABEL: the commit of the working tree, for the record):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; AFTER_LABEL=<commit> bash benchmarks/core_regression.sh \
#     .before . stream
# (the script installs .whl itself into .site/ when diffusers is missing, so the pip line may be left out).
#
# Expected on one H200 (compile times from benchmarks/results/patch-h200 and stream-h100; the after tree's compile
# is shorter where its graphs are identical to the before tree's, which hit the shared inductor cache):
#   stream ~3-6 min (sd-turbo UNet + TAESD compiled twice per tree, b4 and b1: ~80 + ~60 s cold)
#   patch  ~4-7 min (the SDXL patch stale step: ~155 s cold per tree)
#   cfg    ~5-8 min (the SDXL baseline ~100 s cold, a cache hit for the second tree; the CFG step ~96 s cold)
# CORE_BUDGET_S (default 520) bounds the whole section: a tree not set up in time is stopped and the table says so.
# CORE_CACHE=per-tree gives each tree its own inductor/triton cache (both compile cold: comparable setup_s, longer
# run); the default 'shared' lets identical graphs compile once, with the same kernel choices for both trees.
# Output in $OUT (or ./core-out): core-SECTION.json, core-SECTION.md, core-SECTION.log. Copy them into
# benchmarks/results/core-regression/ afterwards (README.md there says what to fill in).
set -uo pipefail
before=${1:?usage: core_regression.sh TREE_BEFORE TREE_AFTER stream|patch|cfg|all}
after=${2:?usage: core_regression.sh TREE_BEFORE TREE_AFTER stream|patch|cfg|all}
section=${3:?usage: core_regression.sh TREE_BEFORE TREE_AFTER stream|patch|cfg|all}
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-core-out}
mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    && export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
[ "$(basename "$before")" = .before ] && export BEFORE_LABEL=${BEFORE_LABEL:-2c12c57}
export PYTHONUNBUFFERED=1
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
  echo "before $before (${BEFORE_LABEL:-?}), after $after (${AFTER_LABEL:-?}), section $section, $(date -u +%FT%TZ)"
} 2>&1 | tee "$out/core-$section.log"
python3 "$here/core_regression.py" --before "$before" --after "$after" --section "$section" --out "$out" "${@:4}" \
  2>&1 | tee -a "$out/core-$section.log"
exit "${PIPESTATUS[0]}"
