#!/usr/bin/env bash
# The device tool sends the working tree's tracked files together with the carried paths, 64 MiB in all.
# The GPU wheels (41.8 MB), the data (3.2 MB) and an H100 kernel cache (about 20.5 MB) leave less room than
# the tree's ~2.4 MB, so for device calls the committed benchmark results (not needed on the device) are
# taken out of the index, and put back afterwards:
#   bash scripts/device_slim_tree.sh out   # before the device calls; refuses while anything is staged
#   bash scripts/device_slim_tree.sh in    # after them, before committing anything (stages new results too)
# While "out", a commit would delete benchmarks/results from the repository: put it back in first.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=.git/info/exclude
case "${1:-}" in
  out)
    if ! git diff --cached --quiet; then
      echo "device_slim_tree: something is staged; commit or unstage it first" >&2; exit 1
    fi
    git rm -r -q --cached benchmarks/results
    grep -qx "benchmarks/results/" "$exclude" 2>/dev/null || echo "benchmarks/results/" >> "$exclude"
    echo "benchmarks/results out of the index; tracked files now $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
    echo "run 'bash scripts/device_slim_tree.sh in' before committing" ;;
  in)
    sed -i '\#^benchmarks/results/$#d' "$exclude"
    git restore --staged benchmarks/results 2>/dev/null || git reset -q -- benchmarks/results
    git add benchmarks/results
    echo "benchmarks/results back in the index" ;;
  *) echo "usage: bash scripts/device_slim_tree.sh out|in" >&2; exit 2 ;;
esac
