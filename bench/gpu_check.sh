#!/usr/bin/env bash
# The GPU check (at most 5 minutes, on a machine with CUDA): the quick benchmark on the GPU
# (training throughput at B = 8/128/1024, sharp against the tutorial loop, the ensemble
# speed-up where bench has it, HVP/gradient, Hessian top-5 and its peers, trace, probe memory,
# ghost BN), then `pytest -m cuda`, written together as one JSON file. Without a GPU it stops
# at once with one line and exit status 2.
#
#   bash bench/gpu_check.sh [--out gpu_check.json] [--python PYTHON] [--budget SECONDS]
set -uo pipefail

usage="usage: bash bench/gpu_check.sh [--out FILE] [--python PYTHON] [--budget SECONDS]"
out=gpu_check.json
python=${PYTHON:-python}
budget=300
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' ($usage)" >&2; exit 2 ;;
    esac
done
case "$budget" in
    ''|*[!0-9]*) echo "gpu_check: --budget '$budget' is not a whole number of seconds" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
out=$(realpath -m "$out")

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False in $python): run it on a GPU machine" >&2
    exit 2
fi

start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The benchmarks, one process each (a timeout loses one), within 70 % of the budget. `ensemble`
# is added where bench registers it; until then the JSON says "ensemble": "not registered".
only="throughput hvp hessian peers trace memory ghost_bn train"
if "$python" -c "import sys; from bench.run import BENCHMARKS; sys.exit(0 if 'ensemble' in BENCHMARKS else 1)"; then
    only="throughput ensemble ${only#throughput }"
fi
deadline=$((start + budget * 7 / 10))
for name in $only; do
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 10 ]; then
        echo "not run: the benchmarks' share of the budget was spent" >"$work/bench-$name.log"
        echo 125 >"$work/bench-$name.rc"
        continue
    fi
    timeout "$left" "$python" -m bench --quick --device cuda --only "$name" --json "$work/bench-$name.json" \
        >/dev/null 2>"$work/bench-$name.log"
    echo $? >"$work/bench-$name.rc"
done
bench_rc=0
for name in $only; do [ "$(cat "$work/bench-$name.rc")" -eq 0 ] || bench_rc=1; done

# The CUDA smoke tests: what is left of the budget (at least its last 30 %).
left=$((start + budget - $(date +%s)))
[ "$left" -lt 5 ] && left=5
timeout "$left" "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
    --junitxml="$work/pytest.xml" >"$work/pytest.log" 2>&1
pytest_rc=$?

"$python" -m bench.gpu_report "$work" "$out" "$pytest_rc" "$only" "$(($(date +%s) - start))"
[ "$bench_rc" -eq 0 ] && [ "$pytest_rc" -eq 0 ]
