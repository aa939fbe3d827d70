#!/usr/bin/env bash
# Export one commit of a ComfyUI git directory (e.g. the bare snapshot the search tool's `fetch`
# brings) to a plain folder outside this repository, for the integration tests (tests/README.md).
# Files the snapshot lacks (its largest blobs) are skipped and listed; SD does not use them.
#   scripts/export_comfyui.sh GIT_DIR COMMIT DEST
set -euo pipefail
src=${1:?usage: export_comfyui.sh GIT_DIR COMMIT DEST}
rev=${2:?usage: export_comfyui.sh GIT_DIR COMMIT DEST}
dest=${3:?usage: export_comfyui.sh GIT_DIR COMMIT DEST}
mkdir -p "$dest"
git --git-dir="$src" ls-tree -r "$rev" | while read -r _mode type sha path; do
  [ "$type" = blob ] || continue
  mkdir -p "$dest/$(dirname "$path")"
  if ! git --git-dir="$src" cat-file blob "$sha" > "$dest/$path" 2>/dev/null; then
    rm -f "$dest/$path"; echo "missing in snapshot: $path" >&2
  fi
done
echo "exported $(git --git-dir="$src" rev-parse "$rev^{commit}") to $dest ($(sed -n 's/^__version__ = "\(.*\)"/ComfyUI \1/p' "$dest/comfyui_version.py"))"
