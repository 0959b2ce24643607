#!/bin/bash
# Two trees benchmarked alternately on one machine (docs/benchmarks.md, "Before and after the
# redesign"): BEFORE and AFTER are checkouts (e.g. `git worktree add --detach ../before c78b5ac`),
# logs go to OUT. About 25 minutes on 2 cores; run it on a quiet machine.
#   BEFORE=../before AFTER=$PWD benchmarks/ab_before_after.sh
set -x
BEFORE=$(cd "${BEFORE:?set BEFORE to the older checkout}" && pwd)
AFTER=$(cd "${AFTER:-.}" && pwd)
OUT=${OUT:-/tmp/bench_ab}
mkdir -p "$OUT"
uptime; lscpu | grep "Model name"
run() {  # tree label command...
  local tree=$1 label=$2; shift 2
  echo "=== $label $(date +%T) $(uptime)"
  (cd "$tree" && PYTHONPATH=$tree "$@") > "$OUT/$label.log" 2>&1
  tail -1 "$OUT/$label.log"
}
run $BEFORE inf_before1 python benchmarks/bench_inference.py
run $AFTER      inf_after1  python benchmarks/bench_inference.py
run $BEFORE inf_before2 python benchmarks/bench_inference.py
run $AFTER      inf_after2  python benchmarks/bench_inference.py
run $BEFORE retag_before1 python benchmarks/bench_retag.py --runs 20 --runs-1024 8
run $AFTER      retag_after1  python benchmarks/bench_retag.py --runs 20 --runs-1024 8
run $BEFORE retag_before2 python benchmarks/bench_retag.py --runs 20 --runs-1024 8
run $AFTER      retag_after2  python benchmarks/bench_retag.py --runs 20 --runs-1024 8
run $BEFORE cb_before1 python benchmarks/bench_callback.py --repeats 1
run $AFTER      cb_after    python benchmarks/bench_callback.py --repeats 2 --lean --peer
run $BEFORE cb_before2 python benchmarks/bench_callback.py --repeats 1
echo "=== done $(date +%T)"
