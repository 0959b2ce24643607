#!/bin/bash
# CPU per frame of the RunEngine's process in process mode, two trees alternately
# (docs/benchmarks.md, "The label cache in the tagging process"): BEFORE and AFTER are
# checkouts or exports (e.g. `git archive 27f6874 | tar -x -C /tmp/base`). About 8 minutes on a
# loaded 2-core machine; CPU ms per frame, unlike wall time, stands some load.
#   BEFORE=/tmp/base AFTER=$PWD benchmarks/ab_profile_process.sh
BEFORE=$(cd "${BEFORE:?set BEFORE to the older tree}" && pwd)
AFTER=$(cd "${AFTER:-.}" && pwd)
for tree in "$BEFORE" "$AFTER" "$BEFORE" "$AFTER"; do
  echo "=== $tree $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
  (cd "$tree" && PYTHONPATH=$tree nice -n 5 python benchmarks/profile_callback_process.py \
      --frames 500 --repeats 2 --modes process)
done
