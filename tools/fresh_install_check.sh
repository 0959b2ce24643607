#!/usr/bin/env bash
# Before a release: run README.md's "Try it" commands, word for word, as a newcomer would:
# in a fresh clone of the committed tree, a new virtual environment and empty caches (pip's
# download cache aside). Both commands must pass the first time.
#
#     tools/fresh_install_check.sh             # both commands (the install, the demo, the suite)
#     tools/fresh_install_check.sh --first     # only the first (install and demo)
#
# The commands are read from the first ```bash block after "## Try it" in README.md, so this
# checks what the README says today. The work folder is removed at the end unless it failed.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ONLY_FIRST=0; [ "${1:-}" = "--first" ] && ONLY_FIRST=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xsml-fresh.XXXXXX")
echo "fresh install check in $WORK"

mapfile -t COMMANDS < <(python3 - "$REPO/README.md" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
section = text[text.index("## Try it"):]
block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
for line in block.splitlines():
    line = re.sub(r"\s+#.*$", "", line).strip()
    if line:
        print(line)
PY
)
[ "${#COMMANDS[@]}" -ge 2 ] || { echo "could not read README's commands" >&2; exit 1; }

git clone --quiet "$REPO" "$WORK/bluesky-xsml"
python3 -m venv "$WORK/venv"
# a new user's environment: this venv first, nothing of ours on PYTHONPATH, no caches of ours
unset PYTHONPATH NUMBA_CACHE_DIR VIRTUAL_ENV
export PATH="$WORK/venv/bin:$PATH"
export XSML_CACHE="$WORK/cache/bluesky-xsml" MPLCONFIGDIR="$WORK/cache/matplotlib"
python -m pip install --quiet --upgrade pip

cd "$WORK/bluesky-xsml"
[ "$ONLY_FIRST" = 1 ] && COMMANDS=("${COMMANDS[0]}")
for cmd in "${COMMANDS[@]}"; do
    echo "+ $cmd"
    start=$SECONDS
    if ! bash -c "$cmd"; then
        echo "FAILED: $cmd (work folder kept: $WORK)" >&2
        exit 1
    fi
    echo "  passed in $((SECONDS - start)) s"
done
cd /
rm -rf "$WORK"
echo "README's commands passed in a fresh environment"
