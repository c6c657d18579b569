#!/usr/bin/env bash
# go build with progress, for builds that take minutes on a fresh machine
# (the pinned Kubernetes binaries, containerd, the product's binaries).
#
#   hack/gobuild.sh WHAT [GO BUILD ARGS...]   e.g. hack/gobuild.sh "kubediskguard-applier" -o bin/x ./applier
#   source hack/gobuild.sh                    defines go_build_progress (hack/test-bins.sh)
#
# go_build_progress WHAT BUILDFLAGS... PKG...: go build, showing how far it is:
# the packages it still has to compile (go list's Stale, for the same flags),
# how many are done (go build -v names each as it compiles it) and an estimate
# of the time left. On a terminal one line is rewritten; elsewhere (CI, a log)
# a line is printed every 10 %. Compiler errors pass through unchanged.
go_build_progress() {
  local what="$1" total start
  shift
  # go list takes the build flags but not -o and -ldflags: drop them.
  local a skip=0
  local -a lf=()
  for a in "$@"; do
    if ((skip)); then skip=0; continue; fi
    case "${a}" in -o|-ldflags) skip=1 ;; *) lf+=("${a}") ;; esac
  done
  total="$(go list -deps -f '{{if .Stale}}x{{end}}' "${lf[@]}" 2>/dev/null | grep -c x || true)"
  start=${SECONDS}
  if ((total == 0)); then
    go build "$@"
    return
  fi
  log "${what}: ${total} packages to compile"
  local tty=0
  [[ -t 2 ]] && tty=1
  go build -v "$@" 2>&1 | {
    local n=0 line pct last=0 left eta
    while IFS= read -r line; do
      if [[ "${line}" =~ ^[A-Za-z0-9._~/-]+$ ]]; then
        n=$((n + 1))
        ((n > total)) && total=${n}
        pct=$((100 * n / total))
        left=$(( (SECONDS - start) * (total - n) / n ))
        eta="$((left / 60))m$((left % 60))s"
        if ((tty)); then
          printf '\r[%s] %s: %d/%d packages (%d%%), about %s left   ' "${GOBUILD_TAG:-build}" "${what}" "${n}" "${total}" "${pct}" "${eta}" >&2
        elif ((pct >= last + 10)); then
          last=$((pct - pct % 10))
          log "${what}: ${n}/${total} packages (${pct}%), $((SECONDS - start))s so far, about ${eta} left"
        fi
      else
        ((tty)) && printf '\n' >&2
        printf '%s\n' "${line}" >&2
      fi
    done
    ((tty)) && printf '\n' >&2
    true
  }
  local rc="${PIPESTATUS[0]}"
  ((rc != 0)) || log "${what}: built in $((SECONDS - start))s"
  return "${rc}"
}


if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  log() { printf '[%s] %s\n' "${GOBUILD_TAG:-build}" "$*" >&2; }
  [[ $# -ge 2 ]] || { echo "usage: $0 WHAT [GO BUILD ARGS...]" >&2; exit 2; }
  go_build_progress "$@"
fi
