#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3 (pip install "mutmut>=3.8,<4").
#
#   tools/mutation.sh                 # every group below (hours: nightly or on demand)
#   tools/mutation.sh gaps policy     # named groups only
#   tools/mutation.sh --list          # the groups, their modules and their tests
#   MUTANTS='bluesky_xsml.inference.tagger.xǁTaggerǁdecide__mutmut_*' tools/mutation.sh inference
#                                     # only the mutants whose names match (fnmatch patterns,
#                                     # space-separated): some functions of a big module
#
# Not part of the normal test run. Each group is mutated in its own scratch copy of the
# tracked tree (under ${XSML_MUTATION_DIR:-build/mutation}/<group>), with only that group's
# fast tests selected, so groups do not share mutmut's caches and the checkout stays clean.
# Prints, per group, the mutants killed / all mutants tested and the score; the per-mutant
# results stay in the scratch copy (`cd build/mutation/<group> && mutmut results`).
# Environment: MUTMUT (default: mutmut), MUTATION_CHILDREN (parallel mutants, default 1),
# XSML_MUTATION_DIR (scratch root), MUTANTS (mutant-name patterns; default: all of the group's),
# MUTATION_ISOLATION (fork or forkserver: where mutants are forked from; default per group),
# PYTEST_K (a -k expression for the group's tests, in place of its own: e.g. only the fast ones).
# The score counts the mutants tested; with MUTANTS the others are "not checked" and left out.
set -euo pipefail

declare -A MODULES=(
  [documents]="bluesky_xsml/documents/callback.py bluesky_xsml/documents/compose.py bluesky_xsml/documents/frames.py bluesky_xsml/documents/frame_index.py"
  [external]="bluesky_xsml/documents/external.py"
  [routing]="bluesky_xsml/documents/routing.py"
  [options]="bluesky_xsml/documents/options.py bluesky_xsml/option_checks.py"
  [labelling]="bluesky_xsml/documents/labelling.py"
  [inference]="bluesky_xsml/inference/tagger.py bluesky_xsml/inference/worker.py"
  [preprocess]="bluesky_xsml/preprocess.py"
  [query]="bluesky_xsml/catalog/query.py"
  [checkpoints]="bluesky_xsml/training/checkpoints.py bluesky_xsml/training/live.py"
  [gate]="bluesky_xsml/training/finetune.py"
  [security]="bluesky_xsml/api/security.py"
  [protocol]="bluesky_xsml/api/protocol.py"
  [gaps]="bluesky_xsml/scaleout/gaps.py"
  [policy]="bluesky_xsml/steering/policy.py"
)
declare -A TESTS=(
  [documents]="tests/test_callback.py tests/test_frame_index.py tests/test_external_frames.py"
  [external]="tests/test_external_frames.py tests/test_callback_external.py tests/test_file_access.py"
  [routing]="tests/test_routing.py tests/test_routing_rules.py"
  [options]="tests/test_option_rules.py tests/test_callback_options.py"
  [labelling]="tests/test_labelling_rules.py"
  [inference]="tests/test_tagger.py tests/test_boundaries.py tests/test_torch_floor.py tests/test_inference_worker_direct.py"
  [preprocess]="tests/test_preprocess_rules.py tests/test_preprocess_properties.py"
  [query]="tests/test_query.py tests/test_frame_index.py tests/test_boundaries.py"
  [checkpoints]="tests/test_replay_checkpoints.py tests/test_service_edges.py tests/test_finetune.py"
  [gate]="tests/test_finetune_gate.py"
  [security]="tests/test_security.py tests/test_api_session.py tests/test_service_edges.py"
  [protocol]="tests/test_service_edges.py"
  [gaps]="tests/test_gaps.py"
  [policy]="tests/test_policy.py"
)
# Extra pytest arguments of a group's test selection (a TOML list's items): the fast tests
# of a file that also holds slow ones (-k also matches module names). The security group
# leaves out the tests that start a real uvicorn server (they test protocol.py, its own
# group). Tests that run the code in a child process (the SIGKILL tests, the 0MQ bus) see
# the unmutated tree and cannot kill a mutant: they are left out, as are slow training tests.
declare -A SELECT=(
  [security]='"-m", "security", "-k", "not endless and not half_sent and not connection_cap and not live_feed and not loopback_is_not_served"'
  [protocol]='"-k", "endless or half_sent or connection_cap or live_feed"'
  [routing]='"-k", "not callback_keeps"'
  [options]='"-k", "rules or refused_with_its_name or normalised_and_replace"'
  [checkpoints]='"-k", "registry or full_disk or write_failing_midway or fails_the_gate or hot_swap_and_rollback or goes_live"'
)
ORDER=(gaps policy security protocol preprocess query documents routing options labelling external
       inference checkpoints gate)
# Groups whose tests run torch: their mutants are forked from a clean fork server, not from
# the process that ran the tests (a fork of a process whose torch thread pool has started
# can deadlock in its first parallel op: the mutant then sits idle until the timeout).
declare -A ISOLATION=([inference]=forkserver [checkpoints]=forkserver [gate]=forkserver
                      [labelling]=forkserver
                      [preprocess]=forkserver
                      [documents]=forkserver [external]=forkserver [query]=forkserver)

if [[ "${1:-}" == "--list" ]]; then
  for g in "${ORDER[@]}"; do
    printf '%s\n  modules: %s\n  tests:   %s %s\n' "$g" "${MODULES[$g]}" "${TESTS[$g]}" "${SELECT[$g]:-}"
  done
  exit 0
fi

root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
scratch=${XSML_MUTATION_DIR:-$root/build/mutation}
mutmut=${MUTMUT:-mutmut}
children=${MUTATION_CHILDREN:-1}
groups=("$@")
[[ ${#groups[@]} -eq 0 ]] && groups=("${ORDER[@]}")

toml_list() { local out="" x; for x in "$@"; do out+="\"$x\", "; done; echo "[${out%, }]"; }
# shellcheck disable=SC2086
selection() {
  local l; l=$(toml_list ${TESTS[$1]})
  [[ -n "${SELECT[$1]:-}" ]] && l="${l%]}, ${SELECT[$1]}]"
  [[ -n "${PYTEST_K:-}" ]] && l="${l%]}, \"-k\", \"${PYTEST_K}\"]"
  echo "$l"
}
read -r -a patterns <<< "${MUTANTS:-}"

for g in "${groups[@]}"; do
  [[ -n "${MODULES[$g]:-}" ]] || { echo "unknown group '$g' (tools/mutation.sh --list)" >&2; exit 2; }
  dir=$scratch/$g
  rm -rf "$dir" && mkdir -p "$dir"
  # the tracked tree as it is now (including uncommitted edits), without .git
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
     | xargs -0 -I{} sh -c 'test -e "{}" && echo "{}"' | tar -cf - -T -) | tar -xf - -C "$dir"
  # shellcheck disable=SC2086
  cat >> "$dir/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["bluesky_xsml"]
# tests read these (docs examples, benchmark helpers) next to tests/
also_copy = ["docs", "benchmarks", "examples", "profiles", "README.md"]
only_mutate = $(toml_list ${MODULES[$g]})
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:faulthandler", "-o", "addopts=", "--timeout=300"]
pytest_add_cli_args_test_selection = $(selection "$g")
process_isolation = "${MUTATION_ISOLATION:-${ISOLATION[$g]:-fork}}"
use_git_change_detection = false
# generous: the per-mutant limit is derived from the measured test time, and a loaded machine
# would otherwise turn slow runs into "timeouts" (counted as killed)
timeout_multiplier = 50.0
timeout_constant = 60.0
TOML
  echo "== $g: ${MODULES[$g]}"
  mkdir -p "$dir/mutants"  # on sys.path before mutmut fills it (else Python caches it as absent)
  (cd "$dir" && XSML_UNDER_MUTMUT=1 PYTHONPATH="$dir/mutants" nice -n 10 "$mutmut" run --max-children "$children" "${patterns[@]}" \
     > "$dir/mutmut-run.log" 2>&1) || { echo "mutmut failed; see $dir/mutmut-run.log" >&2; tail -20 "$dir/mutmut-run.log" >&2; exit 1; }
  (cd "$dir" && "$mutmut" results --all true > "$dir/results.txt" 2>&1 || true)
  python - "$dir/results.txt" "$g" <<'PY'
import collections, re, sys
counts = collections.Counter()
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+): (\w[\w ]*)$", line.rstrip())
    if m:
        counts[m.group(2)] += 1
tested = sum(n for k, n in counts.items() if k not in ("not checked", "skipped", "no tests"))
killed = counts["killed"] + counts["timeout"] + counts["caught by type check"]
score = 100.0 * killed / tested if tested else float("nan")
print(f"{sys.argv[2]}: {killed}/{tested} mutants killed ({score:.1f}%); " + ", ".join(
    f"{k}: {n}" for k, n in sorted(counts.items())))
PY
done
