//! Observability, as SREs use it: the alert rules pass promtool's unit
//! tests, the metrics documentation matches the code, a hot spot (a row
//! lock held against the resolver, a table lock that fills the append pool)
//! shows in the exported metrics, and a real Prometheus scraping a real
//! Gavel evaluates every dashboard and alert query.
//!
//! Gavel runs as its own process here: metrics are process-wide, and other
//! tests' servers share this test process.

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use gavel::telemetry::METRICS;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

const DASHBOARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards");

/// A Prometheus tool from the machine, or a failure saying how to get it.
fn prometheus_tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed; these tests need Prometheus (Debian: apt-get install -y prometheus)")
        })
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(DASHBOARDS).join(path))
        .unwrap_or_else(|e| panic!("reading dashboards/{path}: {e}"))
}

/// `gavel_*` metric names in `text` (recording rules, `gavel:...`, are not).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    for (at, _) in text.match_indices("gavel_") {
        if at > 0 && word(bytes[at - 1]) {
            continue;
        }
        let end = text[at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| at + n);
        names.insert(text[at..end].to_owned());
    }
    names
}

/// The dashboard's queries as Prometheus runs them: Grafana's rate
/// interval replaced by a window that holds several test scrapes.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read("gavel.json")).expect("gavel.json is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    panels
        .iter()
        .filter(|panel| panel["type"] != "row")
        .flat_map(|panel| {
            let title = panel["title"].as_str().expect("panel title").to_owned();
            panel["targets"]
                .as_array()
                .expect("panel targets")
                .iter()
                .map(move |target| {
                    let expr = target["expr"].as_str().expect("target expr");
                    (title.clone(), expr.replace("$__rate_interval", "1m"))
                })
        })
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_each_alert_both_fires_and_stays_silent_in_its_tests() {
    let promtool = prometheus_tool("promtool");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"][..],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(DASHBOARDS)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let rules = read("alerts.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "alerts found: {alerts:?}");
    // Each test case names its alert and ends with `exp_alerts: []`
    // (silent) or a list of expected alerts (firing).
    let tests = read("alerts.test.yml");
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    let lines: Vec<&str> = tests.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.split("alertname: ").nth(1) else {
            continue;
        };
        let name = rest.split([',', '}', ' ']).next().unwrap().to_owned();
        let expectation = if line.contains("exp_alerts") {
            *line
        } else {
            lines[i + 1]
        };
        if expectation.contains("exp_alerts: []") {
            silent.insert(name);
        } else {
            firing.insert(name);
        }
    }
    for alert in &alerts {
        assert!(firing.contains(*alert), "{alert} has no firing test case");
        assert!(silent.contains(*alert), "{alert} has no silent test case");
    }

    // Every alert has a summary and a runbook section that exists.
    let summaries = rules.matches("summary: ").count();
    let runbooks: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert_eq!(summaries, alerts.len(), "one summary per alert");
    assert_eq!(runbooks.len(), alerts.len(), "one runbook_url per alert");
    for (alert, url) in alerts.iter().zip(&runbooks) {
        let (file, anchor) = url.split_once('#').expect("runbook_url has an anchor");
        let path = file
            .strip_prefix("dashboards/")
            .expect("runbook under dashboards/");
        assert_eq!(anchor, alert.to_lowercase(), "{alert}'s runbook anchor");
        let runbook = read(path);
        assert!(
            runbook.lines().any(|l| l == format!("## {alert}")),
            "{file} has a `## {alert}` section"
        );
    }
}

#[test]
fn the_metrics_table_documents_exactly_what_gavel_exports() {
    let readme = read("README.md");
    let documented: HashMap<String, String> = readme
        .lines()
        .filter(|l| l.starts_with("| `gavel_") || l.starts_with("| `process_"))
        .map(|l| {
            let name = l.split('`').nth(1).unwrap().to_owned();
            (name, l.to_owned())
        })
        .collect();
    let exported: BTreeSet<&str> = METRICS.iter().map(|m| m.name).collect();
    let listed: BTreeSet<&str> = documented.keys().map(String::as_str).collect();
    assert_eq!(
        listed, exported,
        "dashboards/README.md lists every metric, and only those"
    );
    for metric in METRICS {
        let row = &documented[metric.name];
        let kind = format!("{:?}", metric.kind).to_lowercase();
        assert!(row.contains(&format!("| {kind} |")), "{row}: kind {kind}");
        for label in metric.labels {
            assert!(row.contains(&format!("`{label}`")), "{row}: label {label}");
        }
    }
    // Every name a panel or an alert uses is one Gavel exports.
    let used = metric_names(&read("gavel.json"))
        .into_iter()
        .chain(metric_names(&read("alerts.yml")));
    for name in used {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(exported.contains(base), "{name} is used but not exported");
    }
}

/// Scrapes until `ready` holds, failing with `what` after 15 s.
async fn scrape_until(app: &TestApp, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    eventually(Duration::from_secs(15), what, || async {
        let scrape = Scrape::take(app).await;
        ready(&scrape).then_some(scrape)
    })
    .await
}

/// What the metrics showed at each stage of [`hot_spot`].
struct HotSpot {
    row_locked: Scrape,
    pool_full: Scrape,
    after: Scrape,
}

/// Settings of a Gavel that shows a hot spot quickly: a small API pool with
/// a short wait, activity sampled every 100 ms, and a webhook URL.
fn hot_spot_settings(replica_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GAVEL_API_POOL_SIZE", "2".into()),
        ("GAVEL_POOL_WAIT_TIMEOUT_MS", "300".into()),
        ("GAVEL_PG_SAMPLE_MS", "100".into()),
        ("GAVEL_REPLICA_URLS", replica_url.into()),
        ("GAVEL_REPLICA_CHECK_MS", "200".into()),
        // A webhook URL, so the webhook panels have series (nothing settles).
        ("GAVEL_WEBHOOK_URLS", "http://127.0.0.1:9/hooks".into()),
        (
            "GAVEL_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        ),
    ]
}

async fn serve(database_url: &str, settings: &[(&'static str, String)]) -> (ServeProcess, TestApp) {
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let process = ServeProcess::start_with(database_url, &settings).await;
    let app = process.client(database_url);
    (process, app)
}

/// Ordinary traffic (bids accepted, refused and replayed, reads from the
/// replica), then a hot spot: a session holds the auction row with
/// `SELECT ... FOR UPDATE` so the resolver's write waits for it, and then
/// holds `bid_log` so appends fill the append writers' pool.
async fn hot_spot(app: &TestApp) -> HotSpot {
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    // Someone watches the auction live, so the streams' metrics have data.
    let mut watcher = app
        .get_as(
            &format!("/api/auctions/{auction_id}/events"),
            "watcher",
            &[],
        )
        .await;
    assert_eq!(watcher.status(), StatusCode::OK);
    let watching = tokio::spawn(async move { while let Ok(Some(_)) = watcher.chunk().await {} });
    let key = new_key();
    for (bidder, amount, key) in [
        ("bidder-1", 1_000, key.clone()),
        ("bidder-2", 1_500, new_key()),
        ("bidder-1", 1_000, key),
    ] {
        let response = app.bid(bidder, &auction_id, amount, &key).await;
        assert!(response.status().is_success(), "{}", response.status());
    }
    let db = app.db().await;
    wait_resolved(&db, id_of(&auction), Duration::from_secs(10)).await;
    let too_low = app.bid("bidder-3", &auction_id, 1, &new_key()).await;
    assert_eq!(too_low.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let path = format!("/api/auctions/{auction_id}");
    eventually(
        Duration::from_secs(15),
        "a read served by the replica",
        || async {
            let read = app.get_as(&path, "reader", &[]).await;
            assert_eq!(read.status(), StatusCode::OK);
            (header(&read, "gavel-read-from") == "replica").then_some(())
        },
    )
    .await;

    let locker = app.db().await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT id FROM auctions WHERE id = '{auction_id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let response = app.bid("bidder-4", &auction_id, 2_500, &new_key()).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let row_locked = scrape_until(app, "the resolver waiting on the row lock", |s| {
        s.sum("gavel_pg_backends", &[("wait_event_type", "Lock")]) >= 1.0
            && s.sum("gavel_pg_blocked_backends", &[]) >= 1.0
            && s.sum("gavel_pg_lock_wait_max_seconds", &[]) > 0.0
            && s.sum("gavel_resolver_pending_bids", &[]) >= 1.0
    })
    .await;
    // Longer than the resolver's lock timeout: it gives up and retries.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    locker.batch_execute("COMMIT").await.unwrap();

    locker
        .batch_execute("BEGIN; LOCK TABLE bid_log IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Bids keep arriving while appends wait on the lock.
    let bidders = (0..30).map(|n| {
        let (http, addr, token) = (
            app.http.clone(),
            app.addr,
            app.token(&format!("crowd-{n}"), &[]),
        );
        let auction_id = auction_id.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(30 * n)).await;
            place_bid(
                &http,
                addr,
                &token,
                &auction_id,
                5_000 + n as i64,
                &new_key(),
            )
            .await
            .status()
        }
    });
    let crowd = tokio::spawn(futures::future::join_all(bidders));
    let pool_full = scrape_until(app, "the append pool full with waiters", |s| {
        let append = [("pool", "append")];
        s.sum("gavel_db_pool_waiting_requests", &append) >= 1.0
            && s.sum("gavel_db_pool_available_connections", &append) == 0.0
            && s.sum("gavel_db_pool_connections", &append) >= 1.0
    })
    .await;
    let statuses = crowd.await.unwrap();
    assert!(
        statuses.contains(&StatusCode::SERVICE_UNAVAILABLE),
        "some bids were answered 503: {statuses:?}"
    );
    locker.batch_execute("ROLLBACK").await.unwrap();
    wait_resolved(&db, id_of(&auction), Duration::from_secs(10)).await;
    let after = scrape_until(app, "the append pool drained", |s| {
        s.sum("gavel_db_pool_waiting_requests", &[("pool", "append")]) == 0.0
            && s.sum("gavel_resolver_pending_bids", &[]) == 0.0
    })
    .await;
    watching.abort();
    HotSpot {
        row_locked,
        pool_full,
        after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_spot_shows_in_the_lock_wait_pool_and_resolver_metrics() {
    let (primary, replicas) = start_primary_and_replicas(1).await;
    let database_url = primary.url("gavel");
    let (process, app) = serve(&database_url, &hot_spot_settings(&replicas[0].url("gavel"))).await;
    let spot = hot_spot(&app).await;

    // The waiter shows under the lock it waits for, as PostgreSQL names it.
    let waiting = spot.row_locked.sum(
        "gavel_pg_backends",
        &[
            ("state", "active"),
            ("wait_event_type", "Lock"),
            ("wait_event", "transactionid"),
        ],
    );
    assert!(waiting >= 1.0, "Lock/transactionid waiters: {waiting}");
    // Resolver lag has buckets of its own, far past any request's deadline.
    let lag_buckets = ["10", "300"].map(|le| {
        spot.after
            .sum("gavel_resolver_lag_seconds_bucket", &[("le", le)])
    });
    assert!(
        lag_buckets[1] >= 1.0 && lag_buckets[1] >= lag_buckets[0],
        "{lag_buckets:?}"
    );
    // The pool gauges moved, and the wait timeouts were counted.
    let append = [("pool", "append")];
    assert!(
        spot.pool_full
            .sum("gavel_db_pool_waiting_requests", &append)
            >= 1.0
    );
    assert!(
        spot.after
            .sum("gavel_db_pool_available_connections", &append)
            >= 1.0
    );
    assert!(spot.after.sum("gavel_db_pool_timeouts_total", &append) >= 1.0);
    assert!(
        spot.after
            .sum("gavel_bids_rejected_total", &[("reason", "overloaded")])
            >= 1.0
    );
    assert_eq!(
        spot.after.sum("gavel_bids_idempotent_replays_total", &[]),
        1.0
    );
    assert_eq!(
        spot.after
            .sum("gavel_bids_rejected_total", &[("reason", "bid_too_low")]),
        1.0
    );
    assert!(
        spot.after.sum(
            "gavel_resolver_bids_resolved_total",
            &[("outcome", "accepted")]
        ) >= 3.0
    );
    assert!(
        spot.after
            .sum("gavel_db_reads_total", &[("target", "replica")])
            >= 1.0
    );

    // Every metric Gavel documents, and so every one a panel or an alert
    // uses, is exported.
    let missing: Vec<&str> = METRICS
        .iter()
        .map(|m| m.name)
        .filter(|name| {
            let histogram = format!("{name}_bucket");
            !spot.after.has(name) && !spot.after.has(&histogram)
        })
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");

    // Structured logs: one line per request with its id, route, status and
    // latency; the resolver's warnings in a span naming the auction.
    let logs = process.logs.lock().unwrap().clone();
    let request = logs
        .iter()
        .find(|e| {
            e["fields"]["message"] == "request finished"
                && e["span"]["route"] == "/api/auctions/{id}/bids"
        })
        .expect("an access log line for a bid");
    assert!(
        request["span"]["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{request}"
    );
    assert_eq!(request["span"]["method"], "POST");
    assert!(request["fields"]["status"].is_u64(), "{request}");
    assert!(request["fields"]["latency_ms"].is_f64(), "{request}");
    let resolver = logs
        .iter()
        .find(|e| e["fields"]["message"] == "resolving failed; will retry")
        .expect("the resolver logged the lock timeout");
    assert!(
        resolver["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "drain" && s["auction_id"].is_string()),
        "{resolver}"
    );
}

/// A Prometheus server on loopback scraping one Gavel every second and
/// evaluating `alerts.yml` every second; stopped and removed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let binary = prometheus_tool("prometheus");
        let dir = std::env::temp_dir().join(format!("gavel-prometheus-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [\"{DASHBOARDS}/alerts.yml\"]\n\
             scrape_configs:\n  - job_name: gavel\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let http = http_client();
        eventually(Duration::from_secs(30), "Prometheus ready", || async {
            let ready = http.get(format!("{}/-/ready", prometheus.url)).send().await;
            ready.ok().filter(|r| r.status().is_success())
        })
        .await;
        prometheus
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let response = http_client()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .expect("Prometheus API");
        response.json().await.expect("Prometheus answers JSON")
    }

    /// An instant query: its status and result.
    async fn query(&self, expr: &str) -> (String, Vec<Value>) {
        let answer = self.api("query", &[("query", expr)]).await;
        let status = answer["status"].as_str().unwrap_or("").to_owned();
        let result = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if status != "success" {
            return (format!("{status}: {}", answer["error"]), result);
        }
        (status, result)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_evaluates_every_dashboard_and_alert_query_against_a_running_gavel() {
    let (primary, replicas) = start_primary_and_replicas(1).await;
    let database_url = primary.url("gavel");
    let (_process, app) = serve(&database_url, &hot_spot_settings(&replicas[0].url("gavel"))).await;
    let prometheus = Prometheus::start(app.admin_addr).await;
    eventually(
        Duration::from_secs(15),
        "Prometheus scraping Gavel",
        || async {
            let (_, up) = prometheus.query(r#"up{job="gavel"} == 1"#).await;
            (!up.is_empty()).then_some(())
        },
    )
    .await;
    hot_spot(&app).await;
    // Rates need two samples: wait for three more scrapes, so every series
    // the traffic created has a few.
    let scrapes = || async {
        let (_, count) = prometheus
            .query(r#"count_over_time(up{job="gavel"}[5m])"#)
            .await;
        count[0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    let before = scrapes().await;
    eventually(Duration::from_secs(15), "three more scrapes", || async {
        (scrapes().await >= before + 3).then_some(())
    })
    .await;

    // Prometheus saw the lock wait.
    eventually(
        Duration::from_secs(15),
        "the lock waiter recorded by Prometheus",
        || async {
            let (_, seen) = prometheus
                .query("max_over_time(gavel:pg_lock_waiters[5m]) >= 1")
                .await;
            (!seen.is_empty()).then_some(())
        },
    )
    .await;

    // Every rule has been evaluated without error.
    let rules = eventually(Duration::from_secs(15), "every rule evaluated", || async {
        let answer = prometheus.api("rules", &[]).await;
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.iter().all(|r| r["health"] == "ok");
        (evaluated && rules.len() >= 20).then_some(rules)
    })
    .await;

    let mut failures = Vec::new();
    for rule in &rules {
        let expr = rule["query"].as_str().unwrap();
        let (status, result) = prometheus.query(expr).await;
        if status != "success" {
            failures.push(format!("rule {}: {status}", rule["name"]));
        } else if rule["type"] == "recording" && result.is_empty() {
            failures.push(format!("recording rule {} returned no data", rule["name"]));
        }
    }
    for (title, expr) in dashboard_queries() {
        let (status, result) = prometheus.query(&expr).await;
        if status != "success" {
            failures.push(format!("panel {title:?}: {status} in {expr}"));
        } else if result.is_empty() {
            failures.push(format!("panel {title:?} returned no data: {expr}"));
        }
    }
    if !failures.is_empty() {
        let targets = prometheus.api("targets", &[]).await;
        panic!("{}\nscrape targets: {targets}", failures.join("\n"));
    }
}
