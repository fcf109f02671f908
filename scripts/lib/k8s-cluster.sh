# shellcheck shell=bash
# The local control plane's binaries, built with the machine's Go from the Go module
# proxy (sourced by scripts/install-tools and scripts/cluster; needs lib/common.sh).
#
# Only the kubelet and the container runtime are simulated (kwok); everything else is
# the real upstream code at the pinned versions below. The builds live outside the
# checkout, in $K8S_CACHE/bin, so a fresh clone on the same machine (CI) reuses them;
# .tools/bin holds symlinks.

# Pinned versions. etcd is the one k8s.io/kubernetes v1.35.4 requires (its go.mod),
# i.e. the one kube-apiserver is built and tested against.
K8S_VERSION="v1.35.4"
K8S_STAGING_VERSION="v0.35.4" # published k8s.io/* staging modules matching K8S_VERSION
ETCD_VERSION="v3.6.5"
KWOK_VERSION="v0.8.0"

NEXUS_CACHE="${NEXUS_CACHE_DIR:-$HOME/.cache/nexus-analytics}"
K8S_CACHE="$NEXUS_CACHE/k8s-$K8S_VERSION"
K8S_BIN="$K8S_CACHE/bin"
K8S_BUILD_LOG="$K8S_CACHE/build-times.log"
# kwok's own Stage definitions (kustomize dirs from its module), passed to kwok --config.
KWOK_STAGES_DIR="$K8S_CACHE/kwok-stages"
KWOK_STAGES=(node/fast node/heartbeat-with-lease pod/fast)
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok)

# Staging modules that k8s.io/kubernetes replaces with ./staging/src/k8s.io/<name>.
K8S_STAGING_MODULES=(
    api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
    cluster-bootstrap code-generator component-base component-helpers controller-manager
    cri-api cri-client csi-translation-lib dynamic-resource-allocation endpointslice
    externaljwt kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl
    kubelet metrics mount-utils pod-security-admission sample-apiserver sample-cli-plugin
    sample-controller
)

# k8s_binary_version NAME: the version a binary is pinned to.
k8s_binary_version() {
    case "$1" in
        kube-*) printf '%s\n' "$K8S_VERSION" ;;
        etcd) printf '%s\n' "$ETCD_VERSION" ;;
        kwok*) printf '%s\n' "$KWOK_VERSION" ;;
        *) return 1 ;;
    esac
}

# k8s_binary_ok NAME: built at the pinned version (a stamp file written after a build).
k8s_binary_ok() {
    local stamp="$K8S_BIN/.$1.version"
    [[ -x "$K8S_BIN/$1" && -f "$stamp" && "$(<"$stamp")" == "$(k8s_binary_version "$1")" ]]
}

# _k8s_timed_build NAME DIR GO-ARGS...: run `go build` in DIR, record wall time and
# peak RSS of the go command and its children (the compiler and linker).
_k8s_timed_build() {
    local name=$1 dir=$2
    shift 2
    local start out rc=0 tfile
    tfile="$(mktemp "${TMPDIR:-/tmp}/k8s-build-time.XXXXXX")"
    start=$(now_ms)
    log "k8s-cluster: building $name $(k8s_binary_version "$name") (nice go build; minutes on a cold cache)"
    (cd "$dir" && GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
        /usr/bin/time -f '%e %M' -o "$tfile" nice -n 10 go build "$@") >&2 || rc=$?
    out="$(<"$tfile")"
    rm -f "$tfile"
    ((rc == 0)) || die "k8s-cluster: go build of $name failed (exit $rc); see the output above"
    printf '%s %s %s wall=%ss peak_rss=%sMiB took=%s\n' "$(date -u +%FT%TZ)" "$name" \
        "$(k8s_binary_version "$name")" "${out%% *}" "$(((${out##* } + 1023) / 1024))" "$(since "$start")" \
        >>"$K8S_BUILD_LOG"
    ok "k8s-cluster: $name built in $(since "$start") (peak RSS $(((${out##* } + 1023) / 1024)) MiB)"
}

_k8s_write_module() {
    local dir=$1 module=$2
    shift 2
    mkdir -p "$dir"
    {
        printf '// Written by scripts/lib/k8s-cluster.sh: builds pinned upstream binaries.\n'
        printf 'module %s\n\ngo 1.25.0\n\nrequire (\n' "$module"
        local req
        for req in "$@"; do printf '\t%s\n' "$req"; done
        printf ')\n'
    } >"$dir/go.mod.new"
    # Keep go.sum (and the module cache's work) when the pins did not change.
    if [[ ! -f "$dir/go.mod.pins" ]] || ! cmp -s "$dir/go.mod.new" "$dir/go.mod.pins"; then
        cp "$dir/go.mod.new" "$dir/go.mod"
        cp "$dir/go.mod.new" "$dir/go.mod.pins"
        rm -f "$dir/go.sum"
    fi
    rm -f "$dir/go.mod.new"
}

_k8s_build_kubernetes() {
    local dir="$K8S_CACHE/src/kubernetes" m minor ldflags
    local reqs=("k8s.io/kubernetes $K8S_VERSION")
    _k8s_write_module "$dir" nexus-analytics.local/k8s-cluster/kubernetes "${reqs[@]}"
    if ! grep -q '^replace' "$dir/go.mod"; then
        {
            printf '\n// k8s.io/kubernetes replaces these with ./staging paths that are not in its module zip.\nreplace (\n'
            for m in "${K8S_STAGING_MODULES[@]}"; do
                printf '\tk8s.io/%s => k8s.io/%s %s\n' "$m" "$m" "$K8S_STAGING_VERSION"
            done
            printf ')\n'
        } >>"$dir/go.mod"
    fi
    minor="${K8S_VERSION#v1.}"
    minor="${minor%%.*}"
    # The version the API server reports (/version, Helm's kubeVersion check, the
    # emulation version) comes from these variables, as in kube's hack/lib/version.sh.
    ldflags="-s -w"
    for m in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $m.gitVersion=$K8S_VERSION -X $m.gitMajor=1 -X $m.gitMinor=$minor"
        ldflags+=" -X $m.gitTreeState=clean -X $m.buildDate=1970-01-01T00:00:00Z"
    done
    local name
    for name in kube-apiserver kube-controller-manager kube-scheduler; do
        k8s_binary_ok "$name" && continue
        _k8s_timed_build "$name" "$dir" -trimpath -ldflags="$ldflags" -o "$K8S_BIN/$name" \
            "k8s.io/kubernetes/cmd/$name"
        k8s_binary_version "$name" >"$K8S_BIN/.$name.version"
    done
}

_k8s_build_etcd() {
    k8s_binary_ok etcd && return 0
    local dir="$K8S_CACHE/src/etcd"
    # etcd's server go.mod replaces its sibling modules with ../ paths (ignored for a
    # dependency), so the requires below pin them to the same release.
    _k8s_write_module "$dir" nexus-analytics.local/k8s-cluster/etcd \
        "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "go.etcd.io/etcd/api/v3 $ETCD_VERSION" \
        "go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION" "go.etcd.io/etcd/client/v3 $ETCD_VERSION" \
        "go.etcd.io/etcd/pkg/v3 $ETCD_VERSION"
    _k8s_timed_build etcd "$dir" -trimpath -ldflags="-s -w" -o "$K8S_BIN/etcd" go.etcd.io/etcd/server/v3
    k8s_binary_version etcd >"$K8S_BIN/.etcd.version"
}

_k8s_build_kwok() {
    local dir="$K8S_CACHE/src/kwok"
    # kwok only: scripts/cluster runs the control plane itself, so kwokctl is not needed.
    _k8s_write_module "$dir" nexus-analytics.local/k8s-cluster/kwok "sigs.k8s.io/kwok $KWOK_VERSION"
    if ! k8s_binary_ok kwok; then
        _k8s_timed_build kwok "$dir" -trimpath \
            -ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
            -o "$K8S_BIN/kwok" sigs.k8s.io/kwok/cmd/kwok
        k8s_binary_version kwok >"$K8S_BIN/.kwok.version"
    fi
    _k8s_kwok_stages "$dir"
}

kwok_stages_ok() { [[ -f "$KWOK_STAGES_DIR/.version" && "$(<"$KWOK_STAGES_DIR/.version")" == "$KWOK_VERSION" ]]; }

# _k8s_kwok_stages DIR: copy kwok's upstream Stages (fast node start, heartbeat with a
# Lease, Pods Running / Job Pods Succeeded / deletion) out of its module.
_k8s_kwok_stages() {
    kwok_stages_ok && return 0
    local src s
    src="$(cd "$1" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
    [[ -d "$src/kustomize/stage" ]] || die "k8s-cluster: no kustomize/stage in the kwok module ($src)"
    rm -rf "$KWOK_STAGES_DIR"
    for s in "${KWOK_STAGES[@]}"; do
        mkdir -p "$KWOK_STAGES_DIR/${s//\//-}"
        cp "$src/kustomize/stage/$s/"*.yaml "$KWOK_STAGES_DIR/${s//\//-}/"
    done
    chmod -R u+w "$KWOK_STAGES_DIR"
    printf '%s\n' "$KWOK_VERSION" >"$KWOK_STAGES_DIR/.version"
}

# install_k8s_cluster: build what is missing, then link every binary into .tools/bin.
install_k8s_cluster() {
    local name missing=()
    for name in "${K8S_BINARIES[@]}"; do k8s_binary_ok "$name" || missing+=("$name"); done
    kwok_stages_ok || missing+=(kwok-stages)
    if ((${#missing[@]})); then
        have go || die "k8s-cluster: go not found (Go >= 1.25 builds the control plane from the Go module proxy)"
        [[ -x /usr/bin/time ]] || apt_ensure time
        mkdir -p "$K8S_BIN"
        log "k8s-cluster: to build into $K8S_BIN: ${missing[*]} ($(go version))"
        _k8s_build_etcd
        _k8s_build_kwok
        _k8s_build_kubernetes
    fi
    mkdir -p "$TOOLS_BIN"
    for name in "${K8S_BINARIES[@]}"; do
        k8s_binary_ok "$name" || die "k8s-cluster: $name missing after the build"
        [[ "$(readlink "$TOOLS_BIN/$name" 2>/dev/null)" == "$K8S_BIN/$name" ]] \
            || ln -sfn "$K8S_BIN/$name" "$TOOLS_BIN/$name"
    done
    ok "k8s-cluster: kube $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION ($K8S_BIN)"
}
