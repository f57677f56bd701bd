#!/usr/bin/env bash
# Build the privdistill image on a host that reaches no container registry ("No registry" in deploy/README.md):
#   1. a local base image: `mmdebstrap` makes a Debian bookworm root filesystem with python3 and
#      python3-venv from the Debian mirror, `docker import` turns it into local/debian-python:bookworm;
#   2. the wheelhouse: every wheel requirements.lock pins, made with this host's pip (Python 3.11)
#      into deploy/docker/wheelhouse/ (git-ignored; the Dockerfile installs from it, no index contacted);
#   3. `docker build` with the classic builder (DOCKER_BUILDKIT=0) from that base and that wheelhouse.
# Steps 1 and 2 are cached (the base tarball in the cache folder, the wheelhouse with a stamp of
# requirements.lock), so a second run only rebuilds the image layers that changed.
#
# usage: deploy/scripts/build-local-image.sh [--tag privdistill:TAG] [--cache DIR] [--python PY]
#        env TORCH_INDEX_URL: an extra index for torch (e.g. https://download.pytorch.org/whl/cpu)
set -euo pipefail

usage() {
  echo "usage: $0 [--tag IMAGE:TAG] [--cache DIR] [--python PYTHON3.11]" >&2
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)"
tag="privdistill:$version"
cache="$repo/.cache/image"
python="${PYTHON:-python3}"
base=local/debian-python:bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) [ $# -ge 2 ] || usage; tag="$2"; shift 2 ;;
    --cache) [ $# -ge 2 ] || usage; cache="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || usage; python="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
case "$tag" in *:*) ;; *) echo "--tag needs IMAGE:TAG, not '$tag'" >&2; exit 2 ;; esac
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 3; }
mkdir -p "$cache"
now() { date +%s; }

# 1. base image
if ! docker image inspect "$base" >/dev/null 2>&1; then
  if [ ! -s "$cache/base.tar" ]; then
    command -v mmdebstrap >/dev/null || { echo "mmdebstrap is not installed (apt-get install mmdebstrap)" >&2; exit 3; }
    t=$(now)
    rm -f "$cache/base.tar.partial"
    mmdebstrap --quiet --format=tar --variant=apt --include=python3,python3-venv,ca-certificates \
      bookworm "$cache/base.tar.partial"
    mv "$cache/base.tar.partial" "$cache/base.tar"
    echo "base: mmdebstrap $(( $(now) - t )) s, $(du -m "$cache/base.tar" | cut -f1) MB"
  fi
  t=$(now)
  docker import --change 'CMD ["python3"]' "$cache/base.tar" "$base" >/dev/null
  echo "base: docker import $(( $(now) - t )) s"
fi

# 2. wheelhouse (for this host's CPython 3.11 on Linux x86_64, like the base's)
wheels="$repo/deploy/docker/wheelhouse"
stamp="$cache/wheelhouse.lock.sha256"  # outside the build context
want="$(sha256sum "$repo/requirements.lock" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! ls "$wheels"/torch-2.13.0*.whl >/dev/null 2>&1; then
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "$python is not Python 3.11 (the base image's): pass --python or PYTHON" >&2; exit 3; }
  t=$(now)
  extra=()
  [ -z "${TORCH_INDEX_URL:-}" ] || extra=(--extra-index-url "$TORCH_INDEX_URL")
  # everything the image installs, and what building privdistill's own wheel needs (setuptools, wheel)
  "$python" -m pip wheel -q --wheel-dir "$wheels" --find-links "$wheels" --constraint "$repo/requirements.lock" \
    "${extra[@]}" "torch==2.13.0" setuptools wheel "$repo"
  rm -f "$wheels"/privdistill-*.whl  # rebuilt from the sources in the image build
  echo "$want" > "$stamp"
  echo "wheelhouse: $(( $(now) - t )) s, $(find "$wheels" -name '*.whl' | wc -l) wheels, $(du -sm "$wheels" | cut -f1) MB"
fi

# 3. the image
t=$(now)
DOCKER_BUILDKIT=0 docker build -q -f "$repo/deploy/docker/Dockerfile" --build-arg "BASE=$base" \
  --build-arg "VERSION=$version" \
  --build-arg "REVISION=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)" \
  -t "$tag" "$repo" >/dev/null
size="$(docker image inspect -f '{{.Size}}' "$tag")"
echo "image $tag: built in $(( $(now) - t )) s, $(( size / 1000000 )) MB"
