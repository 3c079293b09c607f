#!/usr/bin/env bash
# The GPU measurements behind the README's speed tables, on one CUDA device.
#
#   bash benchmarks/gpu_tables.sh OUT_DIR [part ...]      # parts: steps layout maxbatch data (default: all)
#
# Each part writes OUT_DIR/<name>.json (bench_sfl.py records) and OUT_DIR/<name>.txt (its table). The parts can be
# run one call at a time; their durations on a GPU are not yet known.
#   steps     MoCo and SwAV train steps, fp32 and AMP: centralised ceiling, loop, vectorised;
#             10, 100 and 1000 clients (100 sampled per step), batch 1, cut layers 1 and 2
#   layout    the same step at 100 clients x batch 1 with --channels_last, with --compile, with --cudnn_benchmark
#   maxbatch  the largest SwAV multi-crop batch that fits: CIFAR crops (2x32 + 6x16) and the seed's (224/96 px)
#   data      loader throughput (torch; DALI when installed) for both methods
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_tables.sh OUT_DIR [steps|layout|maxbatch|data ...]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(steps layout maxbatch data)
mkdir -p "$out"
python - <<'EOF' | tee "$out/device.txt"
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu_tables.sh needs a CUDA device; on a CPU use benchmarks/bench_sfl.py --device cpu")
print("torch", torch.__version__, "on", torch.cuda.get_device_name())
EOF

bench() {  # bench NAME OPTIONS...: one bench_sfl.py run on the GPU, its table and records kept under OUT_DIR
    local name=$1
    shift
    python benchmarks/bench_sfl.py --device cuda "$@" --json "$out/$name.json" | tee "$out/$name.txt"
}

for part in "${parts[@]}"; do
    case $part in
        steps)
            for method in moco swav; do
                bench "steps_${method}_fp32" --method "$method" --clients 10 100 1000 --per_client_batch 1 \
                      --cutlayer 1 2 --steps 10 --warmup 3 --repeats 5
                bench "steps_${method}_amp" --method "$method" --clients 10 100 1000 --per_client_batch 1 \
                      --cutlayer 1 2 --steps 10 --warmup 3 --repeats 5 --amp
            done ;;
        layout)
            bench layout_moco_nhwc --method moco --clients 100 --per_client_batch 1 --cutlayer 1 2 --amp --channels_last \
                  --steps 10 --warmup 3 --repeats 5
            bench layout_moco_compile --method moco --clients 100 --per_client_batch 1 --cutlayer 1 2 --amp --compile \
                  --steps 10 --warmup 5 --repeats 5
            bench layout_moco_cudnn_benchmark --method moco --clients 100 --per_client_batch 1 --cutlayer 1 2 --amp \
                  --cudnn_benchmark --steps 10 --warmup 3 --repeats 5 ;;
        maxbatch)
            bench maxbatch_swav_cifar --method swav --clients 10 100 --cutlayer 1 --modes centralised loop vmap --amp \
                  --find_max_batch --steps 3 --warmup 1 --repeats 3
            bench maxbatch_swav_seed --method swav --method_config configs/swav_seed.yaml --clients 10 --cutlayer 1 \
                  --modes loop vmap --amp --find_max_batch --steps 3 --warmup 1 --repeats 3 ;;
        data)
            for method in moco swav; do
                bench "data_${method}" --method "$method" --modes data --clients 10 --per_client_batch 64 \
                      --data_dir sample_data/cifar10 --steps 10 --warmup 3 --repeats 5
                bench "data_${method}_workers" --method "$method" --modes data --loaders torch --num_workers 8 \
                      --clients 10 --per_client_batch 64 --data_dir sample_data/cifar10 --steps 10 --warmup 3 --repeats 5
            done ;;
        *)
            echo "unknown part '$part': use steps, layout, maxbatch or data" >&2
            exit 2 ;;
    esac
done
