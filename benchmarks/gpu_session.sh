#!/usr/bin/env bash
# Everything a lent GPU session should run, in one call that fits the device tool's 10-minute
# command limit, most important first, each stage under its own timeout:
#   1. gpu_check.py: the kernels on the hardware against the pure op (a race or a wrong
#      barrier in the cluster kernels shows here first: nothing else has run them on a GPU);
#   2. ttt_kernels.py: the cluster kernels, the Triton ones and the XLA scan, forward and
#      forward+backward, at 63 s (the issue's target shape) and 3 s; then the cluster kernels'
#      forward+backward at 63 s with every state stored (checkpoint_group 1, no recompute);
#      then the kernels on 4 and on 8 CTAs a head at 12 heads (a device's at tensor = 4), one
#      wave each: whether 8 takes the four fifths of 4's time the static estimate says, and so
#      whether the tuning table's wave_cluster holds; then the forward at 63 s on one and on two
#      warpgroups a CTA (`gpu_cluster.forward`'s warpgroups: what the two-warp timeline says);
#   3. kernel_resources.py --topology=local: registers, spills, shared memory and the mini-batch
#      loop's SASS instruction mix (nvidia-cuda-nvdisasm's wheel in .whl brings nvdisasm).
# JSON lines and logs go to $OUT (the device tool brings them back); a summary is printed last,
# with the measured cluster kernels against the static estimates (summarize.py --model: how far the
# latencies kernel_resources assumes are off).
#
# From the dev machine (the GPU image lacks ml-collections: bring its wheel, see README):
#   pip download --no-deps ml-collections nvidia-cuda-nvdisasm -d .whl
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Then copy $OUT's ttt_kernels.jsonl to benchmarks/results/<gpu>.jsonl and commit it.
set -u
OUT=${OUT:-/tmp/ttt-gpu-session}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps "$ROOT"/.whl/ml_collections-*.whl
fi
if ! "$PY" -c "import ml_collections" 2>/dev/null; then  # the benchmarks' configs need it
  echo "gpu_session.sh: ml_collections is missing and .whl/ holds no wheel of it: on the dev" \
    "machine run 'pip download --no-deps ml-collections nvidia-cuda-nvdisasm -d .whl' and" \
    "pass carry=[\".whl\"] to the device call. Nothing was run." | tee "$OUT/summary.txt"
  exit 2
fi
if ! command -v nvdisasm > /dev/null && ls "$ROOT"/.whl/nvidia_cuda_nvdisasm-*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps "$ROOT"/.whl/nvidia_cuda_nvdisasm-*.whl
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
  --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
cd "$ROOT/benchmarks"

stage() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  # (-k: a kernel that hangs on the GPU, a barrier never released, may ignore SIGTERM)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s" >> "$OUT/summary.txt"
}

stage gpu_check 160 "$PY" gpu_check.py \
  --paths=cluster,cluster-g1,cluster8,triton-d32,cluster-wg2 --out="$OUT/gpu_check.jsonl"
stage ttt_kernels 230 "$PY" ttt_kernels.py --backend=gpu --gpu_cluster=4,0 --seconds=63,3 \
  --out="$OUT/ttt_kernels.jsonl"
stage ttt_kernels_g1 50 "$PY" ttt_kernels.py --backend=gpu --gpu_cluster=4 --impls=pallas \
  --seconds=63 --modes=fwd_bwd --checkpoint_group=1 --out="$OUT/ttt_kernels.jsonl"
stage ttt_kernels_waves 75 "$PY" ttt_kernels.py --backend=gpu --gpu_cluster=4,8 \
  --impls=pallas --heads=12 --seconds=63 --out="$OUT/ttt_kernels.jsonl"
stage ttt_kernels_wg2 45 "$PY" ttt_kernels.py --backend=gpu --gpu_cluster=4 --gpu_warpgroups=2 \
  --impls=pallas --seconds=63 --modes=fwd --out="$OUT/ttt_kernels.jsonl"
stage kernel_resources 30 "$PY" kernel_resources.py --topology=local --cluster=4 \
  --kernels=cluster_forward,cluster_backward --warpgroups=2 --out="$OUT/kernel_resources.jsonl"

cat "$OUT/gpu.txt" "$OUT/summary.txt"
grep -E "FAILED|all passed" "$OUT/gpu_check.log"
grep -h '"passed": false' "$OUT/gpu_check.jsonl" 2>/dev/null | head -5
CLOCK=$(nvidia-smi --query-gpu=clocks.max.sm --format=csv,noheader,nounits 2>/dev/null | head -1)
case $CLOCK in ''|*[!0-9]*) CLOCK=1980 ;; esac  # (H100 / H200 SXM)
[ -s "$OUT/ttt_kernels.jsonl" ] && "$PY" summarize.py "$OUT/ttt_kernels.jsonl" \
  --model "$ROOT/benchmarks/results/h100-compile-only-resources-jax0.11.2.jsonl" \
  $(ls "$OUT/kernel_resources.jsonl" 2>/dev/null) --clock_mhz="$CLOCK"
tail -3 "$OUT/ttt_kernels.log"
cat "$OUT/kernel_resources.jsonl" 2>/dev/null
