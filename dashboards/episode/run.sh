#!/usr/bin/env bash
# A lock-wait episode, watched the way an SRE would watch it: `gavel dev`
# under steady bids and reads, a real Prometheus scraping it every second
# with alerts.yml loaded, then
#   - 15 s in: a session holds the auction row (SELECT ... FOR UPDATE) for 20 s,
#   - 10 s later: a session holds LOCK TABLE bid_log for 5 s.
# Bids come from 24 connections, more than the API pool (16), so the table
# lock fills the pool. Afterwards every dashboard query is evaluated over the run and summarised
# per phase (median and max), with the alerts that went pending or fired.
#
# Needs: wrk, prometheus, psql (Debian: apt-get install -y wrk prometheus
# postgresql-client). Run from anywhere; output goes to target/episode/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
for tool in wrk prometheus psql python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (Debian: apt-get install -y wrk prometheus postgresql-client python3)" >&2; exit 1; }
done
api_port=${API_PORT:-18080} admin_port=${ADMIN_PORT:-19090} prom_port=${PROM_PORT:-19191}
(cd "$root" && cargo build --release --quiet)
out="$root/target/episode"
rm -rf "$out" && mkdir -p "$out" && cd "$out"

cleanup() { kill "${prom:-}" 2>/dev/null || true; kill -INT "${dev:-}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

GAVEL_LISTEN=127.0.0.1:$api_port GAVEL_ADMIN_LISTEN=127.0.0.1:$admin_port GAVEL_BID_RATE_LIMIT=0 \
  GAVEL_PG_SAMPLE_MS=1000 GAVEL_LOG=warn "$root/target/release/gavel" dev > dev.out 2> dev.err &
dev=$!
for _ in $(seq 90); do grep -q "Press Ctrl-C" dev.out && break; sleep 1; done
grep -q "Press Ctrl-C" dev.out || { cat dev.err >&2; exit 1; }
export TOKEN AUCTION
TOKEN=$(grep -o "Bearer [^']*" dev.out | head -1 | cut -d' ' -f2)
AUCTION=$(grep -o "auctions/[0-9a-f-]*" dev.out | head -1 | cut -d/ -f2)
pg=$(grep -o "postgres://[^ ]*" dev.out | head -1)

cat > prometheus.yml <<EOT
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["$root/dashboards/alerts.yml"]
scrape_configs:
  - job_name: gavel
    static_configs:
      - targets: ["127.0.0.1:$admin_port"]
EOT
prometheus --config.file=prometheus.yml --storage.tsdb.path=promdata \
  --web.listen-address=127.0.0.1:$prom_port --log.level=warn 2> prometheus.err &
prom=$!
sleep 3

echo "start $(date +%s)" > timeline
wrk -t1 -c24 -d75s -s "$here/bid.lua" "http://127.0.0.1:$api_port" > wrk-bids.txt &
bids=$!
wrk -t1 -c2 -d75s -s "$here/read.lua" "http://127.0.0.1:$api_port" > wrk-reads.txt &
reads=$!
sleep 15
echo "row_lock_begin $(date +%s)" >> timeline
psql "$pg" -qc "BEGIN; SELECT id FROM auctions WHERE id = '$AUCTION' FOR UPDATE; SELECT pg_sleep(20); COMMIT;" > /dev/null
echo "row_lock_end $(date +%s)" >> timeline
sleep 10
echo "table_lock_begin $(date +%s)" >> timeline
psql "$pg" -qc "BEGIN; LOCK TABLE bid_log IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(5); COMMIT;" > /dev/null
echo "table_lock_end $(date +%s)" >> timeline
wait "$bids" "$reads"
sleep 3
echo "end $(date +%s)" >> timeline
python3 "$here/summarise.py" "$root/dashboards/gavel.json" "http://127.0.0.1:$prom_port" | tee summary.txt
