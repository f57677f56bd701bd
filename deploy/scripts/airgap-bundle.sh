#!/usr/bin/env bash
# Make an air-gapped install bundle on a machine with Docker (BuildKit or the classic builder):
#   1. the wheelhouse: every wheel pinned by requirements.lock, downloaded by the Dockerfile's
#      `wheelhouse` stage (so the wheels match the image's Python and platform) and copied out of it, or
#      taken as it is from --wheelhouse DIR (e.g. deploy/docker/wheelhouse/ after `make wheelhouse`: no index);
#   2. the image, built from exactly that wheelhouse (a build context made of the sources and those wheels),
#      saved with `docker save | gzip`;
#   3. the compose files, the admin guide and airgap-install.sh;
#   4. SHA256SUMS over all of it.
# Carry the bundle folder to the target (removable media, data diode) and run airgap-install.sh there.
#
# usage: deploy/scripts/airgap-bundle.sh [--variant cpu|cuda] [--out DIR] [--version V] [--wheelhouse DIR]
#                                        [--base IMAGE]   (the Dockerfile's BASE, e.g. local/debian-python:bookworm)
set -euo pipefail

usage() {
  echo "usage: $0 [--variant cpu|cuda] [--out DIR] [--version VERSION] [--wheelhouse DIR] [--base IMAGE]" >&2
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
variant=cpu
out=""
version=""
wheelhouse=""
base=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) [ $# -ge 2 ] || usage; variant="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
    --version) [ $# -ge 2 ] || usage; version="$2"; shift 2 ;;
    --wheelhouse) [ $# -ge 2 ] || usage; wheelhouse="$2"; shift 2 ;;
    --base) [ $# -ge 2 ] || usage; base="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
case "${BUNDLE_GZIP_LEVEL:-6}" in
  [1-9]) ;;
  *) echo "BUNDLE_GZIP_LEVEL must be 1-9, not '$BUNDLE_GZIP_LEVEL'" >&2; exit 2 ;;
esac
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

if [ -n "$wheelhouse" ] && ! ls "$wheelhouse"/torch-2.13.0*.whl >/dev/null 2>&1; then
  echo "--wheelhouse $wheelhouse holds no torch-2.13.0 wheel: not a wheelhouse (make wheelhouse)" >&2
  exit 2
fi
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 3; }
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "$out exists and is not empty; choose another --out" >&2
  exit 2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/privdistill-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bundle"

build_args=(--build-arg "VARIANT=$variant" --build-arg "VERSION=$version")
[ -z "$base" ] || build_args+=(--build-arg "BASE=$base")

# The build context: the repository itself when --wheelhouse is its deploy/docker/wheelhouse/ (or none is
# given: the Dockerfile then downloads); else a copy of what .dockerignore lets in, with those wheels there.
ctx="$repo"
if [ -n "$wheelhouse" ] && [ "$(cd "$wheelhouse" && pwd -P)" != "$(cd "$repo/deploy/docker/wheelhouse" && pwd -P)" ]; then
  ctx="$work/context"
  mkdir -p "$ctx/deploy/docker/wheelhouse"
  cp -R "$repo/pyproject.toml" "$repo/requirements.lock" "$repo/README.md" "$repo/.dockerignore" \
    "$repo/privdistill" "$repo/site_agent" "$repo/coordinator" "$ctx/"
  cp "$repo/deploy/docker/Dockerfile" "$repo/deploy/docker/healthcheck.py" "$ctx/deploy/docker/"
  cp "$repo/deploy/docker/wheelhouse/README.md" "$ctx/deploy/docker/wheelhouse/"
  cp "$wheelhouse"/*.whl "$ctx/deploy/docker/wheelhouse/"
elif [ -z "$wheelhouse" ] && ls "$repo/deploy/docker/wheelhouse"/torch-2.13.0*.whl >/dev/null 2>&1; then
  echo "note: deploy/docker/wheelhouse/ holds a wheelhouse: the build uses it (no download)" >&2
fi

echo "== wheelhouse ($variant) =="
# the Dockerfile's first stage: every pinned wheel (downloaded, or the given ones) and privdistill's own
docker build -f "$ctx/deploy/docker/Dockerfile" "${build_args[@]}" --target wheelhouse \
  -t "privdistill-wheelhouse:$tag" "$ctx"
cid="$(docker create "privdistill-wheelhouse:$tag" true)"
mkdir -p "$work/bundle/wheels"
docker cp "$cid:/src/deploy/docker/wheelhouse/." "$work/bundle/wheels/"
docker rm "$cid" >/dev/null  # (the tag privdistill-wheelhouse:TAG stays: the build cache of that stage)
rm -f "$work/bundle/wheels/README.md"
cp "$repo/requirements.lock" "$work/bundle/wheels/requirements.lock"
ls "$work/bundle/wheels/privdistill-$version-"*.whl "$work/bundle/wheels"/torch-2.13.0*.whl >/dev/null

echo "== image $image (the same build: its first stage is the wheelhouse above, no index) =="
docker build -f "$ctx/deploy/docker/Dockerfile" "${build_args[@]}" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --build-arg "REVISION=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)" \
  -t "$image" "$ctx"
# BUNDLE_GZIP_LEVEL (1-9, default 6): the image is mostly compiled libraries; 1 is several times faster
docker save "$image" | gzip -c "-${BUNDLE_GZIP_LEVEL:-6}" > "$work/bundle/privdistill-image-$tag.tar.gz"

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
