# shellcheck shell=bash
# Autoscaling tools (issue 12) built with the machine's Go from the Go module proxy
# (sourced by scripts/install-tools; needs lib/common.sh and lib/k8s-cluster.sh).
#
# Each tool gets its own build module in $AUTOSCALE_CACHE/src/<name>: it requires the
# upstream module at the pinned version and repeats the upstream go.mod's replace
# directives (a dependency's replaces are ignored by Go); a local replace (./pkg/...,
# a nested module not in the module zip) becomes the same nested module at the same
# version. The proxy here serves these exact versions only (its @v/list answers 403).

PROM_OPERATOR_VERSION="v0.93.0" # the CRD schemas in ../shared/schemas are v0.93.0
PROM_ADAPTER_VERSION="v0.12.0"
SKAFFOLD_VERSION="v2.24.0" # skaffold.yaml is v4beta14 (../shared/schemas is v2.24.0): v2.16.1 refuses it
KEDA_VERSION="v2.20.2" # the ScaledObject schema in ../shared/schemas is v2.20.2
# Debian's prometheus 2.42 is built without kubernetes_sd_configs ("field
# kubernetes_sd_configs not found"), which every config the operator generates uses.
# v0.313.1 is Prometheus v3.13.1 (LTS): the module prometheus-operator v0.93.0 builds
# against and its default Prometheus version. Built without the embedded web UI
# (the HTTP API, which the tests use, is complete).
PROMETHEUS_VERSION="v0.313.1"
PROMETHEUS_RELEASE="3.13.1"

AUTOSCALE_CACHE="$NEXUS_CACHE/autoscale"
AUTOSCALE_BIN="$AUTOSCALE_CACHE/bin"
AUTOSCALE_BUILD_LOG="$AUTOSCALE_CACHE/build-times.log"

# name|module|version|package[|extra ldflags[|build tags]]
AUTOSCALE_TOOLS=(
    "prometheus-operator|github.com/prometheus-operator/prometheus-operator|$PROM_OPERATOR_VERSION|cmd/operator"
    "prometheus|github.com/prometheus/prometheus|$PROMETHEUS_VERSION|cmd/prometheus|-X github.com/prometheus/common/version.Version=$PROMETHEUS_RELEASE|remove_all_sd,enable_kubernetes_sd"
    "prometheus-adapter|sigs.k8s.io/prometheus-adapter|$PROM_ADAPTER_VERSION|cmd/adapter"
    "skaffold|github.com/GoogleContainerTools/skaffold/v2|$SKAFFOLD_VERSION|cmd/skaffold"
    "keda-operator|github.com/kedacore/keda/v2|$KEDA_VERSION|cmd/operator"
    "keda-adapter|github.com/kedacore/keda/v2|$KEDA_VERSION|cmd/adapter"
)

_as_field() { local IFS='|'; read -r -a _f <<<"$1"; printf '%s\n' "${_f[$2]:-}"; }

# autoscale_tool_version NAME: the pinned version of a tool, from the table above.
autoscale_tool_version() {
    local t
    for t in "${AUTOSCALE_TOOLS[@]}"; do
        [[ $(_as_field "$t" 0) == "$1" ]] && { _as_field "$t" 2; return 0; }
    done
    die "autoscale-tools: no tool named $1"
}

autoscale_tool_ok() {
    local name=$1 version=$2 stamp="$AUTOSCALE_BIN/.$1.version"
    [[ -x "$AUTOSCALE_BIN/$name" && -f "$stamp" && "$(<"$stamp")" == "$version" ]]
}

# _as_replaces MODULE VERSION: the upstream go.mod's replace directives, one per line,
# local ones rewritten to MODULE/<path> VERSION.
_as_replaces() {
    local module=$1 version=$2 gomod
    gomod="$(cd "$AUTOSCALE_CACHE" && GOTOOLCHAIN=local GOFLAGS=-mod=mod \
        go mod download -json "$module@$version" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
    [[ -f "$gomod" ]] || die "autoscale-tools: no go.mod for $module@$version"
    awk -v mod="$module" -v ver="$version" '
        /^replace \(/ { inblock = 1; next }
        inblock && /^\)/ { inblock = 0; next }
        /^replace / { sub(/^replace /, ""); line = $0 }
        inblock { line = $0 }
        line != "" {
            sub(/\/\/.*/, "", line); gsub(/^[ \t]+|[ \t]+$/, "", line)
            if (line ~ /=>/) {
                split(line, p, /[ \t]*=>[ \t]*/)
                if (p[2] ~ /^\.\//) { sub(/^\.\//, "", p[2]); print p[1] " => " mod "/" p[2] " " ver }
                else print p[1] " => " p[2]
            }
            line = ""
        }' "$gomod"
}

_as_build() {
    local name=$1 module=$2 version=$3 pkg=$4 ldflags="-s -w ${5:-}" tags=${6:-}
    local dir="$AUTOSCALE_CACHE/src/$name" start tfile out rc=0
    mkdir -p "$dir"
    if [[ ! -f "$dir/go.mod" ]] || ! grep -q "^require $module $version\$" "$dir/go.mod"; then
        {
            printf '// Written by scripts/lib/autoscale-tools.sh: builds a pinned upstream binary.\n'
            printf 'module nexus-analytics.local/autoscale/%s\n\ngo 1.26.0\n\nrequire %s %s\n' \
                "$name" "$module" "$version"
            _as_replaces "$module" "$version" | sed 's/^/replace /'
        } >"$dir/go.mod"
        rm -f "$dir/go.sum"
    fi
    tfile="$(mktemp "${TMPDIR:-/tmp}/as-build-time.XXXXXX")"
    start=$(now_ms)
    log "autoscale-tools: building $name $version ($module/$pkg; minutes on a cold cache)"
    (cd "$dir" && GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
        /usr/bin/time -f '%e %M' -o "$tfile" nice -n 10 go build -trimpath -tags="$tags" -ldflags="$ldflags" \
        -o "$AUTOSCALE_BIN/$name" "$module/$pkg") >&2 || rc=$?
    out="$(<"$tfile")"
    rm -f "$tfile"
    printf '%s %s %s rc=%s wall=%ss peak_rss=%sMiB took=%s\n' "$(date -u +%FT%TZ)" "$name" "$version" \
        "$rc" "${out%% *}" "$(((${out##* } + 1023) / 1024))" "$(since "$start")" >>"$AUTOSCALE_BUILD_LOG"
    ((rc == 0)) || { warn "autoscale-tools: go build of $name failed (exit $rc)"; return 1; }
    printf '%s\n' "$version" >"$AUTOSCALE_BIN/.$name.version"
    ok "autoscale-tools: $name built in $(since "$start") (peak RSS $(((${out##* } + 1023) / 1024)) MiB)"
}

# The operators' CRDs at the pinned versions, copied out of their modules (the e2e test
# applies them with server-side apply: the Prometheus CRD is too large for client-side).
# KEDA's operator watches all of its own: ScaledObjects, ScaledJobs,
# (Cluster)TriggerAuthentications, CloudEventSources.
PROM_OPERATOR_CRDS="$AUTOSCALE_CACHE/prometheus-operator-crd-$PROM_OPERATOR_VERSION"
KEDA_CRDS="$AUTOSCALE_CACHE/keda-crd-$KEDA_VERSION"

# _as_module_crds DEST TOOL MODULE DIR: the *.yaml of DIR in the MODULE that TOOL's build
# module requires, copied to DEST once.
_as_module_crds() {
    local dest=$1 tool=$2 module=$3 dir=$4 src
    [[ -f "$dest/.complete" ]] && return 0
    src="$(cd "$AUTOSCALE_CACHE/src/$tool" && GOTOOLCHAIN=local GOFLAGS=-mod=mod \
        go list -m -f '{{.Dir}}' "$module")"
    [[ -d "$src/$dir" ]] || die "autoscale-tools: no CRDs in $src/$dir"
    rm -rf "$dest"
    mkdir -p "$dest"
    cp "$src/$dir/"*.yaml "$dest/"
    chmod -R u+w "$dest"
    touch "$dest/.complete"
}

# autoscale_crds: the CRDs of whichever of the two operators is built.
autoscale_crds() {
    [[ -x "$AUTOSCALE_BIN/prometheus-operator" ]] && _as_module_crds "$PROM_OPERATOR_CRDS" \
        prometheus-operator github.com/prometheus-operator/prometheus-operator example/prometheus-operator-crd
    [[ -x "$AUTOSCALE_BIN/keda-operator" ]] && _as_module_crds "$KEDA_CRDS" \
        keda-operator github.com/kedacore/keda/v2 config/crd/bases
    return 0
}

# install_autoscale_tools: build what is missing (KEDA last: the largest tree), link
# every built binary into .tools/bin; fails naming the tools that did not build.
# NEXUS_AUTOSCALE_TOOLS (comma-separated names, e.g. keda-operator,keda-adapter) limits
# it to those: scripts/e2e-autoscale --kind keda needs only KEDA.
install_autoscale_tools() {
    local t name module version pkg extra tags failed=()
    have go || die "autoscale-tools: go not found"
    [[ -x /usr/bin/time ]] || apt_ensure time
    mkdir -p "$AUTOSCALE_BIN" "$TOOLS_BIN"
    local only=",${NEXUS_AUTOSCALE_TOOLS:-},"
    for t in "${AUTOSCALE_TOOLS[@]}"; do
        name=$(_as_field "$t" 0) module=$(_as_field "$t" 1) version=$(_as_field "$t" 2) pkg=$(_as_field "$t" 3)
        extra=$(_as_field "$t" 4) tags=$(_as_field "$t" 5)
        [[ $only == ",," || $only == *",$name,"* ]] || continue
        if ! autoscale_tool_ok "$name" "$version"; then
            _as_build "$name" "$module" "$version" "$pkg" "$extra" "$tags" || { failed+=("$name"); continue; }
        fi
        ln -sfn "$AUTOSCALE_BIN/$name" "$TOOLS_BIN/$name"
    done
    autoscale_crds
    ((${#failed[@]} == 0)) || die "autoscale-tools: not built: ${failed[*]} (see $AUTOSCALE_BUILD_LOG)"
    [[ $only == ",," ]] || { ok "autoscale-tools: ${NEXUS_AUTOSCALE_TOOLS} ($AUTOSCALE_BIN)"; return 0; }
    ok "autoscale-tools: prometheus-operator $PROM_OPERATOR_VERSION, prometheus $PROMETHEUS_RELEASE, prometheus-adapter $PROM_ADAPTER_VERSION, skaffold $SKAFFOLD_VERSION, keda $KEDA_VERSION ($AUTOSCALE_BIN)"
}
