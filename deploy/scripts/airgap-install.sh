#!/usr/bin/env bash
# Install an air-gapped bundle made by airgap-bundle.sh on a host WITHOUT internet access:
# verify every file against SHA256SUMS, then `docker load` the image (or, with --venv DIR, install
# privdistill into a Python 3.11 virtual environment from the bundled wheelhouse instead).
# Nothing is loaded or installed unless every checksum matches.
#
# usage: airgap-install.sh [BUNDLE_DIR] [--venv DIR]      (BUNDLE_DIR defaults to this script's folder)
set -euo pipefail

usage() {
  echo "usage: $0 [BUNDLE_DIR] [--venv DIR]" >&2
  exit 2
}

bundle=""
venv=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || usage; venv="$2"; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) [ -z "$bundle" ] || usage; bundle="$1"; shift ;;
  esac
done
bundle="${bundle:-$(dirname "${BASH_SOURCE[0]}")}"
bundle="$(cd "$bundle" && pwd)"

[ -f "$bundle/SHA256SUMS" ] || { echo "$bundle/SHA256SUMS not found: not a privdistill bundle" >&2; exit 3; }
[ -f "$bundle/IMAGE" ] || { echo "$bundle/IMAGE not found: not a privdistill bundle" >&2; exit 3; }

echo "== verifying $(wc -l < "$bundle/SHA256SUMS") files against SHA256SUMS =="
if ! (cd "$bundle" && sha256sum --check --strict --quiet SHA256SUMS); then
  echo "checksum verification FAILED: the bundle is damaged or was changed; nothing was installed" >&2
  exit 5
fi
# every file in the bundle must be listed (nothing slipped in beside the checked ones)
unlisted="$(cd "$bundle" && find . -type f ! -name SHA256SUMS | LC_ALL=C sort \
  | comm -23 - <(sed 's/^[0-9a-f]*  //' SHA256SUMS | LC_ALL=C sort))"
if [ -n "$unlisted" ]; then
  echo "files not covered by SHA256SUMS (nothing was installed):" >&2
  echo "$unlisted" >&2
  exit 5
fi
image="$(cat "$bundle/IMAGE")"

if [ -n "$venv" ]; then
  echo "== installing privdistill into $venv from the wheelhouse (no index) =="
  python3 -m venv "$venv"
  "$venv/bin/pip" install --no-index --find-links "$bundle/wheels" \
    --constraint "$bundle/wheels/requirements.lock" privdistill
  "$venv/bin/privdistill-site" --version
  exit 0
fi

command -v docker >/dev/null || { echo "docker is not installed (or pass --venv DIR)" >&2; exit 3; }
archive="$(find "$bundle" -maxdepth 1 -name 'privdistill-image-*.tar.gz' | head -n 1)"
[ -n "$archive" ] || { echo "no privdistill-image-*.tar.gz in $bundle" >&2; exit 3; }
echo "== docker load $(basename "$archive") =="
gzip -dc "$archive" | docker load
docker image inspect "$image" >/dev/null
echo "loaded $image. Next: copy $bundle/compose/ to the install folder, fill .env (PRIVDISTILL_VERSION=${image#*:})"
echo "and follow README.md."
