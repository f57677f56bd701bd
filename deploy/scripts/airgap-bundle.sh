#!/usr/bin/env bash
# Make an air-gapped install bundle on a machine WITH internet access and Docker (BuildKit):
#   1. the wheelhouse: every wheel pinned by deploy/docker/constraints.txt (pip wheel / pip download inside
#      the Dockerfile's `wheelhouse` stage, so the wheels match the image's Python and platform);
#   2. the image, built from exactly that wheelhouse, saved with `docker save | gzip`;
#   3. the compose files, the admin guide and airgap-install.sh;
#   4. SHA256SUMS over all of it.
# Carry the bundle folder to the target (removable media, data diode) and run airgap-install.sh there.
#
# usage: deploy/scripts/airgap-bundle.sh [--variant cpu|cuda] [--out DIR] [--version V]
set -euo pipefail

usage() {
  echo "usage: $0 [--variant cpu|cuda] [--out DIR] [--version VERSION]" >&2
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
variant=cpu
out=""
version=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) [ $# -ge 2 ] || usage; variant="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
    --version) [ $# -ge 2 ] || usage; version="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
case "$variant" in
  cpu|cuda) ;;
  *) echo "--variant must be cpu or cuda, not '$variant'" >&2; exit 2 ;;
esac
if [ -z "$version" ]; then
  version="$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)"
fi
[ -n "$version" ] || { echo "could not read the version from pyproject.toml; pass --version" >&2; exit 2; }
tag="$version"
[ "$variant" = cpu ] || tag="$version-$variant"
image="privdistill:$tag"
out="${out:-$repo/dist/privdistill-$tag-airgap}"

command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 3; }
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "$out exists and is not empty; choose another --out" >&2
  exit 2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/privdistill-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bundle"

echo "== wheelhouse ($variant) =="
docker build -f "$repo/deploy/docker/Dockerfile" --build-arg "VARIANT=$variant" --target wheels \
  --output "type=local,dest=$work/bundle/wheels" "$repo"
cp "$repo/deploy/docker/constraints.txt" "$work/bundle/wheels/constraints.txt"
ls "$work/bundle/wheels/privdistill-$version-"*.whl >/dev/null

echo "== image $image (from the wheelhouse above, no index) =="
docker build -f "$repo/deploy/docker/Dockerfile" --build-arg "VARIANT=$variant" --build-arg "VERSION=$version" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --build-arg "REVISION=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-context "wheels=$work/bundle/wheels" -t "$image" "$repo"
docker save "$image" | gzip -c > "$work/bundle/privdistill-image-$tag.tar.gz"

echo "== compose files and guide =="
mkdir -p "$work/bundle/compose"
cp -R "$repo/deploy/compose/." "$work/bundle/compose/"
cp "$repo/deploy/README.md" "$work/bundle/README.md"
cp "$repo/deploy/scripts/airgap-install.sh" "$work/bundle/airgap-install.sh"
echo "$image" > "$work/bundle/IMAGE"

(cd "$work/bundle" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) > "$work/SHA256SUMS"
mv "$work/SHA256SUMS" "$work/bundle/SHA256SUMS"

mkdir -p "$(dirname "$out")"
rm -rf "$out"
mv "$work/bundle" "$out"
echo "bundle: $out ($(du -sh "$out" | cut -f1)); image $image"
echo "on the target: $out/airgap-install.sh $out"
