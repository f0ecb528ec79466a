#!/usr/bin/env bash
# Replays auction endings against Gavel and compares it with the classic
# designs (row_lock, row_lock_fn, optimistic), in one run on this machine:
#
#   loadtests/run.sh final-minute            # the targets (about 4 minutes with two modes; each mode adds its share)
#   loadtests/run.sh max-rate                # highest sustainable rates, three rounds (about 30 minutes with two modes; each mode adds its share)
#   loadtests/run.sh final-minute max-rate   # both
#
# For each scenario (a name in loadtests/scenarios/ or a path to a .toml
# file) it starts a private PostgreSQL primary and streaming replica (fsync
# on), runs Gavel in log mode and in each baseline mode (--modes; all four
# by default) on fresh databases,
# audits each run, measures the database's raw append ceiling with pgbench,
# and writes report.md, report.json and chart.svg under
# loadtests/reports/<scenario>-<time>/. Options after `--` go to
# `gavel-loadtest bench` (see `gavel-loadtest bench --help`), e.g.
#   loadtests/run.sh final-minute -- --rate-scale 0.5 --modes log
set -euo pipefail
cd "$(dirname "$0")/.."

scenarios=()
while [[ $# -gt 0 && $1 != "--" ]]; do
    scenarios+=("$1")
    shift
done
[[ ${1:-} == "--" ]] && shift
if [[ ${#scenarios[@]} -eq 0 ]]; then
    echo "usage: loadtests/run.sh SCENARIO... [-- BENCH OPTIONS]" >&2
    echo "scenarios: $(cd loadtests/scenarios && ls *.toml | sed 's/\.toml$//' | tr '\n' ' ')" >&2
    exit 2
fi

have_server() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if ! have_server; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing the PostgreSQL server binaries (apt-get install -y postgresql) ..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    else
        echo "the load tests need PostgreSQL's server binaries and pgbench: apt-get install -y postgresql" >&2
        exit 1
    fi
fi

cargo build --release --locked -p gavel -p gavel-loadtest

for scenario in "${scenarios[@]}"; do
    file=$scenario
    [[ -f $file ]] || file=loadtests/scenarios/$scenario.toml
    if [[ ! -f $file ]]; then
        echo "no scenario '$scenario' (looked for $file)" >&2
        exit 2
    fi
    target/release/gavel-loadtest bench "$file" "$@"
done
