#!/usr/bin/env bash
# Regenerate deploy/docker/constraints.txt from the project's .venv (pins every installed distribution
# except the editable project itself; torch without its local label so both image variants match it).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv_pip="${VENV:-.venv}/bin/pip"
out=deploy/docker/constraints.txt
tmp="$(mktemp "${out}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
  echo "# Pinned versions for the privdistill image and the air-gapped wheelhouse (pip -c this file)."
  echo "# Generated from the development .venv: \`.venv/bin/pip freeze --all --exclude-editable\`, torch pinned without its"
  echo "# local label (torch==2.13.0 matches 2.13.0+cpu from the CPU index and the CUDA build from PyPI)."
  echo "# Regenerate with deploy/scripts/freeze-constraints.sh after changing dependencies."
  "$venv_pip" freeze --all --exclude-editable | grep -v '^#' | grep -iv '^privdistill' | sed -E 's/^torch==.*/torch==2.13.0/'
} > "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out ($(grep -c '==' "$out") pins)"
