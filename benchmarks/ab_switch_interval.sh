#!/usr/bin/env bash
# The stress scan with Python's default GIL switch interval (5 ms) against 0.5 ms in every
# process of the run (the RunEngine's and the tagging process, set by a sitecustomize module on
# PYTHONPATH), interleaved: ROUNDS rounds of `bench_callback.py --only stress --repeats 3` each.
# Compare the process-mode scan times and the RunEngine thread's "blocked" column.
#   bash benchmarks/ab_switch_interval.sh [ROUNDS]      (about 70 s per run on 2 cores)
set -euo pipefail
ROUNDS=${1:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
echo "import sys; sys.setswitchinterval(0.0005)" > "$SITE/sitecustomize.py"
for i in $(seq "$ROUNDS"); do
  echo "=== round $i: default switch interval"
  python "$HERE/bench_callback.py" --only stress --repeats 3 | grep -E "^\[|untagged |process |RE thread"
  echo "=== round $i: switch interval 0.5 ms"
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" python "$HERE/bench_callback.py" --only stress --repeats 3 \
    | grep -E "^\[|untagged |process |RE thread"
done
