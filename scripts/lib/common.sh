# shellcheck shell=bash
# Shared helpers for scripts/*. Source it; do not execute it.
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# Repository root (scripts/lib/.. /..), independent of the caller's cwd.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS_DIR="$ROOT/.tools"
TOOLS_BIN="$TOOLS_DIR/bin"
VENV_DIR="$TOOLS_DIR/venv"
RUN_DIR="$TOOLS_DIR/run"
export ROOT TOOLS_DIR TOOLS_BIN VENV_DIR RUN_DIR

# Local endpoints (see contract.md "Local services"); used by the sourcing scripts.
# shellcheck disable=SC2034
{
KAFKA_HOST=127.0.0.1
KAFKA_PORT="${NEXUS_KAFKA_PORT:-9092}" # override to run a second checkout's broker beside the first
PG_HOST=127.0.0.1
PG_PORT="${NEXUS_PG_PORT:-5432}" # override only to test these scripts
METRICS_PORT_LOCAL="${NEXUS_METRICS_PORT:-9090}"
DEV_DATABASE_URL="postgres://nexus:nexus@${PG_HOST}:${PG_PORT}/nexus_analytics"
DEV_KAFKA_BROKERS="${KAFKA_HOST}:${KAFKA_PORT}"
}

_SCRIPT_NAME="$(basename "${0:-script}")"

if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
    _C_RED=$'\e[31m' _C_YEL=$'\e[33m' _C_GRN=$'\e[32m' _C_DIM=$'\e[2m' _C_OFF=$'\e[0m'
else
    _C_RED='' _C_YEL='' _C_GRN='' _C_DIM='' _C_OFF=''
fi

# All human-readable output goes to stderr so stdout stays machine-friendly.
log()  { printf '%s[%s]%s %s\n' "$_C_DIM" "$_SCRIPT_NAME" "$_C_OFF" "$*" >&2; }
ok()   { printf '%s[%s] ok:%s %s\n' "$_C_GRN" "$_SCRIPT_NAME" "$_C_OFF" "$*" >&2; }
warn() { printf '%s[%s] WARNING:%s %s\n' "$_C_YEL" "$_SCRIPT_NAME" "$_C_OFF" "$*" >&2; }
die()  { printf '%s[%s] ERROR:%s %s\n' "$_C_RED" "$_SCRIPT_NAME" "$_C_OFF" "$*" >&2; exit 1; }

# Report the failing command and line instead of exiting silently under `set -e`.
_on_err() {
    local rc=$? line=${1:-?} cmd=${2:-?}
    printf '%s[%s] ERROR:%s command failed (exit %s) at line %s: %s\n' \
        "$_C_RED" "$_SCRIPT_NAME" "$_C_OFF" "$rc" "$line" "$cmd" >&2
}
trap '_on_err "$LINENO" "$BASH_COMMAND"' ERR

have() { command -v "$1" >/dev/null 2>&1; }

# now_ms: wall clock in milliseconds (for timings in messages).
now_ms() { date +%s%3N; }
# since SECONDS_STR_MS: "1.234s" since a now_ms value.
since() { local d=$(($(now_ms) - $1)); printf '%d.%03ds' $((d / 1000)) $((d % 1000)); }

# port_open HOST PORT: true when a TCP connect succeeds (bash /dev/tcp, 2 s cap).
port_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# wait_port HOST PORT SECONDS [PID]: wait for a listener; fail early if PID dies.
wait_port() {
    local host=$1 port=$2 secs=$3 pid=${4:-} i
    for ((i = 0; i < secs * 10; i++)); do
        port_open "$host" "$port" && return 0
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 2
        fi
        sleep 0.1
    done
    return 1
}

# running PID: the process exists and is not a zombie (a child of the caller
# that exited but was not reaped yet still answers kill -0).
running() {
    kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    [[ "${stat:0:1}" != Z ]]
}

# pid_alive PIDFILE [NAME]: prints the pid and succeeds when the pid file names a
# live process (whose command line contains NAME, guarding against pid reuse).
pid_alive() {
    local file=$1 name=${2:-} pid
    [[ -s "$file" ]] || return 1
    pid="$(<"$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    running "$pid" || return 1
    if [[ -n "$name" && -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name" || return 1
    fi
    printf '%s\n' "$pid"
}

# stop_pidfile PIDFILE MATCH GRACE_SECONDS [LABEL]: SIGTERM, wait up to GRACE, then
# SIGKILL, and wait until the process has really gone. Removes the pid file.
stop_pidfile() {
    local file=$1 match=$2 grace=$3 name=${4:-$2} pid i
    if ! pid="$(pid_alive "$file" "$match")"; then
        rm -f "$file"
        return 0
    fi
    log "stopping $name (pid $pid, SIGTERM, up to ${grace}s)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        running "$pid" || break
        sleep 0.1
    done
    if running "$pid"; then
        warn "$name (pid $pid) still alive after ${grace}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            running "$pid" || break
            sleep 0.1
        done
        running "$pid" && die "could not kill $name (pid $pid)"
    fi
    rm -f "$file"
    ok "$name stopped"
}

# pg_bin_dir: directory holding initdb/pg_ctl/postgres (highest installed major).
pg_bin_dir() {
    local d v best='' best_v=-1
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] || continue
        v="$(basename "$(dirname "$d")")"
        [[ "$v" =~ ^[0-9]+$ ]] || v=0
        if ((v > best_v)); then best=$d best_v=$v; fi
    done
    if [[ -z "$best" ]] && have pg_config; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]] && best=$d
    fi
    [[ -n "$best" ]] || return 1
    printf '%s\n' "$best"
}

# pg_super [psql args...]: run psql as the PostgreSQL superuser, reading SQL from
# stdin or -c. Tries, in order: the postgres OS user over the unix socket (peer or
# trust auth), then postgres over 127.0.0.1 without a password (trust auth).
pg_super() {
    if [[ $EUID -eq 0 ]] && id postgres >/dev/null 2>&1 && have runuser; then
        (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@")
    elif have sudo && sudo -n -u postgres true 2>/dev/null; then
        (cd / && sudo -n -u postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@")
    else
        psql -X -q -w -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres "$@"
    fi
}

# http_status URL: prints the HTTP status code (000 when unreachable).
http_status() {
    if have curl; then
        curl -s -o /dev/null -m 3 -w '%{http_code}' "$1" || true
    else
        python3 - "$1" <<'PY' || echo 000
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
    fi
}

# http_get URL: prints the body (empty when unreachable).
http_get() {
    if have curl; then
        curl -s -m 5 "$1" || true
    else
        python3 -c 'import sys,urllib.request;sys.stdout.write(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())' "$1" 2>/dev/null || true
    fi
}
