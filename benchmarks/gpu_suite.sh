#!/usr/bin/env bash
# Every GPU figure this project needs, in one command (issues 20, 25): Markdown tables in one folder, within
# 9 minutes on one H100/H200, on a fresh machine without network.
#
#   benchmarks/gpu_suite.sh [--tests] [OUTPUT_DIR]           # on a GPU machine; default folder gpu_suite/
#   benchmarks/gpu_suite.sh --smoke [--tests] [OUTPUT_DIR]   # on the CPU, tiny sizes: checks that every part runs
#
# First it installs the project into the environment of $PYTHON (default: the first python3 on PATH), with
# `python3 -m pip`, without network or build isolation: editable, from this checkout (the app finds its
# configs as `pkg://fishr_lightning.app.configs` only so), after the wheels in .whl/ if there are any
# (benchmarks/device_wheels.sh gathers them; they go into a folder put first on PYTHONPATH). Then each part
# runs under its own time limit, in a process group of its own that is killed whole when the limit passes;
# on a GPU their limits and grace periods add up to 540 s, under the 570 s below with a margin. A part that
# fails or runs out is named in its file, in the output as it ends, and in the last line. Parts (files):
#   machine.md                                    the GPU, the cores, the versions, where the project is installed
#   gpu_tests.md (with --tests, first)            the tests marked `gpu` (pytest -m gpu), which skip without CUDA
#   overhead_32-true.md, overhead_bf16-mixed.md   Fishr over ERM, PACS and DomainNet sizes, ResNet-50 224²,
#                                                 closed form and BackPACK (benchmarks/overhead.py)
#   overhead_16-mixed.md                          Fishr (closed form) in 16-mixed, against 32-true above
#   training_throughput.md                        the app's training images/s per image pipeline against the
#                                                 same step on tensors in memory (is it data-bound?)
#   data_pipeline.md                              images/s per core of both pipelines, the device part and
#                                                 nvjpeg decoding on the GPU, pixel differences
#   app_decode.md                                 ms per step of `python train.py` with data.decode=device
#                                                 against data.decode=cpu (benchmarks/app_decode.py)
#   evaluation.md                                 evaluation images/s (benchmarks/evaluation.py)
#   backbones.md, backbones_channels_last_compile.md   the backbone presets' step times
# Then paste the tables into BENCHMARKS.md with the machine's description (machine.md).
#
# On this workplace's GPU machine (the `device` tool; its image lacks a few of our dependencies): here,
# `bash benchmarks/device_wheels.sh` (wheels into .whl/, which git ignores and the tool carries), then one
# `run` with carry [".whl"], timeout_s=600 and this command (the suite's own parts stop in time; the outer
# timeout is a last resort that still leaves the tool time to bring back what finished):
#
#   timeout 570 bash benchmarks/gpu_suite.sh --tests gpu_suite; tar czf $OUT/gpu_suite.tgz gpu_suite
#
# One file comes back (the tool returns at most 8). tests/test_gpu_suite.py runs this very line with --smoke
# on the CPU, in a copy of the repository where the project is not installed.
set -uo pipefail

smoke=0
tests=0
out=gpu_suite
for arg in "$@"; do
    case "$arg" in
        --smoke) smoke=1 ;;
        --tests) tests=1 ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
        *) out="$arg" ;;
    esac
done
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out"
rm -f "$out"/*.failed "$out/summary.md"
python=${PYTHON:-python3}
cores=$("$python" -c 'import os; print(len(os.sched_getaffinity(0)))')  # not nproc: it follows OMP_NUM_THREADS
grace=5  # seconds between a part's SIGTERM and its SIGKILL
started_at=$SECONDS

# start NAME SECONDS COMMAND...: COMMAND in the background under a time limit; its stdout and stderr go to
# OUTPUT_DIR/NAME.stdout and .stderr. `timeout` puts it in a process group of its own, and on the limit
# sends SIGTERM, then SIGKILL after the grace period, to that whole group: the part's loader workers and
# subprocesses end with it. The suite's own SIGTERM (the outer timeout) is passed on to every running group.
declare -A pids limits begun
start() {
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout --kill-after="$grace" "$limit" "$@" < /dev/null > "$out/$name.stdout" 2> "$out/$name.stderr" &
    pids[$name]=$! limits[$name]=$limit begun[$name]=$SECONDS
}

# finish NAME: waits for the part, then records it. record NAME STATUS [WHY]: the part's stdout becomes
# OUTPUT_DIR/NAME.md unless the part wrote that file itself; a failure or a timeout is written there, marked
# (NAME.failed) and said, the part named. Both return the part's status.
failures=()
finish() {
    wait "${pids[$1]}"
    record "$1" $?
}
record() {
    local name=$1 status=$2 file="$out/$1.md" seconds=$((SECONDS - begun[$1]))
    unset "pids[$name]"
    if [ ! -s "$file" ]; then cp "$out/$name.stdout" "$file"; fi
    if [ "$status" -eq 0 ]; then
        echo "   $name done in $seconds s"
        return 0
    fi
    local why="exit status $status after $seconds s"
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then why="killed at its limit of ${limits[$name]} s"; fi
    why=${3:-$why}
    touch "$out/$name.failed"
    failures+=("$name ($why)")
    echo "**$name did not finish** ($why): see $name.stderr" >> "$file"
    echo "   $name FAILED ($why), see $out/$name.stderr"
    return "$status"
}

part() { start "$@"; finish "$1"; }

summary() {
    local list=""
    if [ ${#failures[@]} -gt 0 ]; then list=$(printf ', %s' "${failures[@]}"); list=": ${list#, }"; fi
    echo "Tables in $out/ (${#failures[@]} part(s) failed$list); $((SECONDS - started_at)) s in all." | tee -a "$out/summary.md"
}

alive() {  # whether a running part's process group has a process left
    local name
    for name in "${!pids[@]}"; do kill -0 -- "-${pids[$name]}" 2> /dev/null && return 0; done
    return 1
}

stop() {  # the suite was told to stop (SIGTERM, SIGINT): every running part's group too, then the summary
    trap - TERM INT HUP
    local name status tenths=0
    for name in "${!pids[@]}"; do kill -TERM -- "-${pids[$name]}" 2> /dev/null; done
    while alive && [ $tenths -lt $((grace * 10)) ]; do sleep 0.1; tenths=$((tenths + 1)); done
    for name in "${!pids[@]}"; do
        kill -KILL -- "-${pids[$name]}" 2> /dev/null
        wait "${pids[$name]}"
        status=$?
        if [ $status -eq 143 ] || [ $status -eq 137 ]; then  # else it had ended by itself, not yet recorded
            record "$name" $status "stopped with the suite after $((SECONDS - begun[$name])) s"
        else
            record "$name" $status
        fi
    done
    summary
    exit 143
}
trap stop TERM INT HUP

abort() {  # a set-up step failed: no part can run
    echo "error: $1 failed, so no part can run; see $out/$1.stderr" | tee -a "$out/summary.md"
    summary
    exit 1
}

# The install (issue 25): the suite used to run the checkout's code from src/ on PYTHONPATH, where the app's
# configs are not a package (they are `configs/`, installed as fishr_lightning.app.configs), so every
# app-level part failed. The wheels go where the device tool's README puts them (a folder on PYTHONPATH, which
# takes precedence over the image's own versions); the project editable into the environment, whose
# setuptools builds it (the dev extra's, or the GPU image's).
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
pip=("$python" -m pip install -q --no-index --no-deps --disable-pip-version-check --no-cache-dir)
if [ ${#wheels[@]} -gt 0 ]; then
    site="${TMPDIR:-/tmp}/gpu_suite_site"
    part wheels 45 "${pip[@]}" --no-compile --upgrade --target "$site" "${wheels[@]}" || abort wheels
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Compiled once here rather than by each part that imports it first (side by side in a smoke run).
part install 40 bash -c '"$@" --no-build-isolation --editable . && "$1" -m compileall -q src benchmarks > /dev/null' \
    install "${pip[@]}" || abort install

describe_machine() {  # without importing torch (seconds of the smoke run): versions from the installs' metadata
    echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null || echo "no GPU (smoke run)"
    "$python" - <<'PY'
import os, platform
from importlib.metadata import version
from importlib.util import find_spec

print(f"CPU: {len(os.sched_getaffinity(0))} cores usable; {platform.processor() or platform.machine()}, "
      f"Python {platform.python_version()}, torch {version('torch')}, lightning {version('lightning')}")
print(f"fishr-lightning {version('fishr-lightning')} from {os.path.dirname(find_spec('fishr_lightning').origin)}")
PY
}
export -f describe_machine
export python

if [ $smoke -eq 1 ]; then
    # Side by side (no GPU to share): the smoke run's time is mostly each process importing torch.
    # One overhead run (its three modes at tiny sizes are tests/test_scale.py's): the GPU runs' other options.
    start machine 180 bash -c describe_machine
    if [ $tests -eq 1 ]; then
        # The files that hold tests marked gpu (tests/test_gpu_suite.py checks that every CUDA-only test is
        # marked), so that pytest imports only those; on the CPU they only skip.
        mapfile -t gpu_test_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
        start gpu_tests 180 "$python" -m pytest -q -rs -m gpu -p no:cacheprovider "${gpu_test_files[@]}"
    fi
    start overhead_16-mixed 180 "$python" benchmarks/overhead.py --device cpu --tiny --in-process --steps 1 --warmup 1 --workers 0 --modes closed_form --output "$out/overhead_16-mixed.md"
    start training_throughput 180 "$python" benchmarks/training_throughput.py --smoke --output "$out/training_throughput.md"
    start data_pipeline 180 "$python" benchmarks/data_pipeline.py --device cpu --sizes pacs --images 1 --repeats 1 --batch 2 --densities 90:6 --density-size pacs --end-to-end --output "$out/data_pipeline.md"
    start app_decode 180 "$python" benchmarks/app_decode.py --smoke --output "$out/app_decode.md"
    start evaluation 180 "$python" benchmarks/evaluation.py --images-per-class 1 --image-size 32 --evaluations 1 --workers 0
    for name in "${!pids[@]}"; do finish "$name"; done
else
    # One after the other (they share the GPU). The limits (tests/test_gpu_suite.py adds them up) were set
    # without a GPU measurement: a part killed at its limit says so, and its workload or limit is then adjusted.
    part machine 30 bash -c describe_machine
    if [ $tests -eq 1 ]; then
        # On a GPU first and alone: the figures mean little if the GPU paths they time are broken.
        mapfile -t gpu_test_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
        part gpu_tests 85 "$python" -m pytest -q -rs -m gpu -p no:cacheprovider "${gpu_test_files[@]}"
    fi
    workers=$(( cores > 1 ? cores - 1 : 0 ))
    overhead=(--device cuda --steps 10 --warmup 2 --workers "$workers")
    part overhead_32-true 45 "$python" benchmarks/overhead.py "${overhead[@]}" --precision 32-true --output "$out/overhead_32-true.md"
    part overhead_bf16-mixed 40 "$python" benchmarks/overhead.py "${overhead[@]}" --precision bf16-mixed --output "$out/overhead_bf16-mixed.md"
    part overhead_16-mixed 20 "$python" benchmarks/overhead.py "${overhead[@]}" --precision 16-mixed --modes closed_form --output "$out/overhead_16-mixed.md"
    part training_throughput 35 "$python" benchmarks/training_throughput.py --device cuda --backbone resnet50 --precision bf16-mixed --images-per-class 2 --steps 10 --warmup 3 --output "$out/training_throughput.md"
    part data_pipeline 30 "$python" benchmarks/data_pipeline.py --device cuda --images 6 --repeats 2 --densities --end-to-end --output "$out/data_pipeline.md"
    part app_decode 45 "$python" benchmarks/app_decode.py --device cuda --sizes pacs terra_incognita --steps 20 --images-per-class 2 --output "$out/app_decode.md"
    part evaluation 20 "$python" benchmarks/evaluation.py --device cuda --model resnet18 --images-per-class 10 --evaluations 2 --workers 0 "$workers"
    part backbones 15 "$python" benchmarks/backbones.py --device cuda --batch-size 32 --reps 3
    part backbones_channels_last_compile 25 "$python" benchmarks/backbones.py --device cuda --batch-size 32 --reps 3 --channels-last --compile --presets resnet50 convnext_tiny vit_small
fi

summary
exit $(( ${#failures[@]} > 0 ))
