# Shared by scripts/run.sh and scripts/test.sh: installs what switchyard needs on a
# Debian machine (idempotently) and sets up the build cache. Source it; don't run it.

SWITCHYARD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SWITCHYARD_CACHE="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
# Builds are reused across clones (CI clones afresh each run).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SWITCHYARD_CACHE/target}"
VENV="$SWITCHYARD_CACHE/venv"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages: only those missing are installed.
ensure_debian_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
      echo "switchyard: installing ${missing[*]} needs root (run as root or install them)" >&2
      return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "switchyard: cargo not found; install a Rust toolchain (rustc >= 1.95)" >&2
    return 1
  fi
}

# kubectl, to render the kustomize base and overlays in deploy/kubernetes: Debian's
# kubernetes-client (kubectl 1.20, kustomize v2.0.3) only when none is on PATH.
ensure_kubectl() {
  command -v kubectl >/dev/null || ensure_debian_packages kubernetes-client
}

# Python test clients in a venv of their own, reinstalled only when the list changes.
ensure_python_clients() {
  ensure_debian_packages python3 python3-venv
  # kubernetes-validate ships the Kubernetes OpenAPI schemas: the deploy manifests are
  # validated offline against them (integration/python/test_deploy.py).
  local wanted="grpcio==1.85.1 grpcio-reflection==1.85.1 protobuf pytest==9.2.0 kubernetes-validate==1.37.0"
  if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.wanted" 2>/dev/null)" != "$wanted" ]]; then
    log "installing Python test clients into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check $wanted
    echo "$wanted" >"$VENV/.wanted"
  fi
}
