#!/usr/bin/env bash
# Every GPU figure this project needs, in one command (issue 20): Markdown tables in one folder, within
# 8 minutes on one H100/H200 (each part has its own time limit; a part that runs out says so in its file).
#
#   benchmarks/gpu_suite.sh [--tests] [OUTPUT_DIR]           # on a GPU machine; default folder gpu_suite/
#   benchmarks/gpu_suite.sh --smoke [--tests] [OUTPUT_DIR]   # on the CPU, tiny sizes: checks that every part runs
#
# Parts (files in OUTPUT_DIR):
#   gpu_tests.md (with --tests, first)            the tests marked `gpu` (pytest -m gpu), which skip without CUDA
#   overhead_32-true.md, overhead_bf16-mixed.md   Fishr over ERM, PACS and DomainNet sizes, ResNet-50 224²,
#                                                 closed form and BackPACK (benchmarks/overhead.py)
#   overhead_16-mixed.md                          Fishr (closed form) in 16-mixed, against 32-true above
#   training_throughput.md                        the app's training images/s per image pipeline against the
#                                                 same step on tensors in memory (is it data-bound?)
#   data_pipeline.md                              images/s per core of both pipelines, the device part and
#                                                 nvjpeg decoding on the GPU, pixel differences
#   evaluation.md                                 evaluation images/s (benchmarks/evaluation.py)
#   backbones.md, backbones_channels_last_compile.md   the backbone presets' step times
# Then paste the tables into BENCHMARKS.md with the machine's description (machine.md).
#
# On this workplace's GPU machine (the `device` tool; its image lacks a few of our dependencies): here,
# `bash benchmarks/device_wheels.sh` (wheels into .whl/), then one `run` with carry [".whl"] and
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   && export PYTHONPATH=/tmp/site:$PWD/src PYTHON=python3 && timeout 540 bash benchmarks/gpu_suite.sh --tests gpu_suite;
#   tar czf $OUT/gpu_suite.tgz gpu_suite
# and timeout_s=600: one file comes back (the tool returns at most 8), with whatever parts finished in time.
set -uo pipefail

smoke=0
tests=0
out=gpu_suite
for arg in "$@"; do
    case "$arg" in
        --smoke) smoke=1 ;;
        --tests) tests=1 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) out="$arg" ;;
    esac
done
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out"
python=${PYTHON:-python}
cores=$("$python" -c 'import os; print(len(os.sched_getaffinity(0)))')  # not nproc: it follows OMP_NUM_THREADS
rm -f "$out"/*.failed

# part NAME SECONDS COMMAND...: run COMMAND under a time limit; its stdout goes to OUTPUT_DIR/NAME.md
# unless the command writes that file itself; a failure or a timeout is written there and marked (NAME.failed).
part() {
    local name=$1 limit=$2; shift 2
    local file="$out/$name.md" started=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
    local status=$?
    if [ ! -s "$file" ]; then cp "$out/$name.stdout" "$file"; fi
    if [ $status -ne 0 ]; then
        touch "$out/$name.failed"
        echo "**$name did not finish** (exit status $status after $((SECONDS - started)) s; 124: over its ${limit} s): see $name.stderr" >> "$file"
        echo "   failed (status $status), see $out/$name.stderr"
    else
        echo "   done in $((SECONDS - started)) s"
    fi
}

{
    echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU (smoke run)"
    echo "CPU: $cores cores usable; $("$python" -c 'import platform, torch, lightning; print(platform.processor() or platform.machine(), "torch", torch.__version__, "lightning", lightning.__version__)')"
} > "$out/machine.md"

if [ $tests -eq 1 ]; then
    # The files that hold tests marked gpu (tests/test_gpu_suite.py checks that every CUDA-only test is marked),
    # so that pytest imports only those. On a GPU first and alone: the figures mean little if the GPU paths
    # they time are broken; in a smoke run beside the other parts (on the CPU they only skip).
    mapfile -t gpu_test_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
    if [ $smoke -eq 1 ]; then
        part gpu_tests 120 "$python" -m pytest -q -rs -m gpu -p no:cacheprovider "${gpu_test_files[@]}" &
    else
        part gpu_tests 180 "$python" -m pytest -q -rs -m gpu -p no:cacheprovider "${gpu_test_files[@]}"
    fi
fi

if [ $smoke -eq 1 ]; then
    # Side by side (no GPU to share): the smoke run's time is mostly each process importing torch.
    # One overhead run (its three modes at tiny sizes are tests/test_scale.py's): the GPU runs' other options.
    part overhead_16-mixed 120 "$python" benchmarks/overhead.py --device cpu --tiny --in-process --steps 1 --warmup 1 --workers 0 --modes closed_form --output "$out/overhead_16-mixed.md" &
    part training_throughput 120 "$python" benchmarks/training_throughput.py --smoke --output "$out/training_throughput.md" &
    part data_pipeline 120 "$python" benchmarks/data_pipeline.py --device cpu --sizes pacs --images 1 --repeats 1 --batch 2 --densities 90:6 --density-size pacs --end-to-end --output "$out/data_pipeline.md" &
    part evaluation 120 "$python" benchmarks/evaluation.py --images-per-class 1 --image-size 32 --evaluations 1 --workers 0 &
    wait
else
    workers=$(( cores > 1 ? cores - 1 : 0 ))
    overhead=(--device cuda --steps 15 --warmup 3 --workers "$workers")
    part overhead_32-true 80 "$python" benchmarks/overhead.py "${overhead[@]}" --precision 32-true --output "$out/overhead_32-true.md"
    part overhead_bf16-mixed 70 "$python" benchmarks/overhead.py "${overhead[@]}" --precision bf16-mixed --output "$out/overhead_bf16-mixed.md"
    part overhead_16-mixed 35 "$python" benchmarks/overhead.py "${overhead[@]}" --precision 16-mixed --modes closed_form --output "$out/overhead_16-mixed.md"
    part training_throughput 80 "$python" benchmarks/training_throughput.py --device cuda --backbone resnet50 --precision bf16-mixed --images-per-class 2 --output "$out/training_throughput.md"
    part data_pipeline 55 "$python" benchmarks/data_pipeline.py --device cuda --images 6 --repeats 2 --densities --end-to-end --output "$out/data_pipeline.md"
    part evaluation 35 "$python" benchmarks/evaluation.py --device cuda --model resnet18 --images-per-class 10 --evaluations 2 --workers 0 "$workers"
    part backbones 35 "$python" benchmarks/backbones.py --device cuda --batch-size 32 --reps 3
    part backbones_channels_last_compile 60 "$python" benchmarks/backbones.py --device cuda --batch-size 32 --reps 3 --channels-last --compile --presets resnet50 convnext_tiny vit_small
fi

failed=$(find "$out" -name '*.failed' | wc -l)
echo "Tables in $out/ ($failed part(s) failed); $SECONDS s in all."
exit $((failed > 0))
