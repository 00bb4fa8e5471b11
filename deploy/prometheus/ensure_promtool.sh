#!/usr/bin/env bash
# Print the path of a working promtool, fetching one into segflow's cache on first use.
# tests/deploy/test_prometheus.py runs this, so a fresh machine needs no manual step.
#
# Looks, in order, for:
#   1. $PROMTOOL, when set (then nothing else is tried)
#   2. promtool on PATH
#   3. <cache>/prometheus/promtool, cached by an earlier run
#      (<cache> is $SEGFLOW_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/segflow, like the Kafka jars)
# and else installs into <cache>/prometheus/:
#   4. from Debian's `prometheus` package: `apt-get download` and unpack it (no system install,
#      no daemon started; `apt-get update` first when the package is not found and we are root);
#      about 10 s. The package's `prometheus` binary is kept beside promtool.
#   5. else from source with Go: promtool of Prometheus $PROMTOOL_GO_VERSION through the Go
#      module proxy (it downloads about 3 GB of modules into a temporary folder, removed after;
#      15-30 minutes on 2 busy cores).
# stdout is the path alone; progress goes to stderr. Exits 1 with the reasons when all fail.
set -euo pipefail

PROMTOOL_GO_VERSION="${PROMTOOL_GO_VERSION:-v0.309.1}"  # Prometheus 3.9.1 as a Go module version

say() { echo "ensure_promtool: $*" >&2; }

works() { [[ -x "$1" ]] && "$1" --version >/dev/null 2>&1; }

if [[ -n "${PROMTOOL:-}" ]]; then
  works "$PROMTOOL" || { say "PROMTOOL=$PROMTOOL does not run"; exit 1; }
  echo "$PROMTOOL"; exit 0
fi
if found=$(command -v promtool) && works "$found"; then
  echo "$found"; exit 0
fi

cache="${SEGFLOW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/segflow}"
dest="$cache/prometheus"
if works "$dest/promtool"; then
  echo "$dest/promtool"; exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.promtool-XXXXXX")
cleanup() { chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
reasons=()

install_dir() {  # move $1 (a folder holding promtool) to $dest atomically enough for two runs
  local tmpdest="$cache/.prometheus-$$"
  rm -rf "$tmpdest"
  mv "$1" "$tmpdest"
  rm -rf "$dest"
  mv "$tmpdest" "$dest"
}

from_debian() {
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || { reasons+=("debian: apt-get/dpkg-deb not available"); return 1; }
  say "fetching Debian's prometheus package (for promtool) ..."
  if ! (cd "$work" && apt-get download -q prometheus) >"$work/apt.log" 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
      say "apt-get download failed; running apt-get update and retrying ..."
      apt-get update -q -o DPkg::Lock::Timeout=120 >>"$work/apt.log" 2>&1 || true
      (cd "$work" && apt-get download -q prometheus) >>"$work/apt.log" 2>&1 \
        || { reasons+=("debian: apt-get download failed: $(tail -n 2 "$work/apt.log" | tr '\n' ' ')"); return 1; }
    else
      reasons+=("debian: apt-get download failed and apt-get update needs root: $(tail -n 1 "$work/apt.log")")
      return 1
    fi
  fi
  dpkg-deb -x "$work"/prometheus_*.deb "$work/deb" \
    || { reasons+=("debian: could not unpack the package"); return 1; }
  mkdir -p "$work/out"
  cp "$work/deb/usr/bin/promtool" "$work/out/promtool"
  [[ -f "$work/deb/usr/bin/prometheus" ]] && cp "$work/deb/usr/bin/prometheus" "$work/out/prometheus"
  works "$work/out/promtool" || { reasons+=("debian: the packaged promtool does not run"); return 1; }
  install_dir "$work/out"
}

from_go() {
  command -v go >/dev/null || { reasons+=("go: go is not installed"); return 1; }
  say "building promtool $PROMTOOL_GO_VERSION with Go (slow: many minutes) ..."
  # `go install pkg@version` refuses Prometheus's go.mod (replace/exclude directives), so
  # download the module and build it as the main module.
  export GOMODCACHE="$work/mod" GOCACHE="$work/gocache" GOFLAGS=-modcacherw GOTOOLCHAIN=local
  local dir
  dir=$(go mod download -json "github.com/prometheus/prometheus@$PROMTOOL_GO_VERSION" 2>"$work/go.log" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') \
    || { reasons+=("go: module download failed: $(tail -n 2 "$work/go.log" | tr '\n' ' ')"); return 1; }
  [[ -n "$dir" ]] || { reasons+=("go: module download failed: $(tail -n 2 "$work/go.log" | tr '\n' ' ')"); return 1; }
  mkdir -p "$work/out"
  (cd "$dir" && go build -o "$work/out/promtool" ./cmd/promtool) >>"$work/go.log" 2>&1 \
    || { reasons+=("go: build failed: $(grep -v '^go: downloading' "$work/go.log" | tail -n 3 | tr '\n' ' ')"); return 1; }
  works "$work/out/promtool" || { reasons+=("go: the built promtool does not run"); return 1; }
  install_dir "$work/out"
}

if from_debian || from_go; then
  say "installed $("$dest/promtool" --version 2>&1 | head -n 1) in $dest"
  echo "$dest/promtool"
  exit 0
fi
say "could not get promtool. Install it (Debian/Ubuntu: apt-get install prometheus) or set PROMTOOL."
for r in "${reasons[@]}"; do say "  $r"; done
exit 1
