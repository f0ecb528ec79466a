//! The `gavel` binary itself: configuration errors, `token`, `migrate`, and
//! the README's `gavel dev` quick start.

use std::process::{Command, Stdio};
use std::time::Duration;

use gavel::auth::{JwtKeys, Role};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

fn gavel() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gavel"));
    for (name, _) in std::env::vars() {
        if name.starts_with("GAVEL_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bad_setting_stops_startup_with_one_line_naming_it() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GAVEL_JWT_SECRET", SECRET)], "GAVEL_DATABASE_URL"),
        (
            &[("GAVEL_DATABASE_URL", "postgres://gavel@127.0.0.1:1/x")],
            "GAVEL_JWT_SECRET",
        ),
        (
            &[
                ("GAVEL_DATABASE_URL", "postgres://gavel@127.0.0.1:1/x"),
                ("GAVEL_JWT_SECRET", "too-short"),
            ],
            "GAVEL_JWT_SECRET",
        ),
        (
            &[
                ("GAVEL_DATABASE_URL", "postgres://gavel@127.0.0.1:1/x"),
                ("GAVEL_JWT_SECRET", SECRET),
                ("GAVEL_LISTEN", "localhost"),
            ],
            "GAVEL_LISTEN",
        ),
        (
            &[
                ("GAVEL_DATABASE_URL", "postgres://gavel@127.0.0.1:1/x"),
                ("GAVEL_JWT_SECRET", SECRET),
                ("GAVEL_WEBHOOK_URLS", "ftp://market.example/hooks"),
                (
                    "GAVEL_WEBHOOK_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
            ],
            "GAVEL_WEBHOOK_URLS",
        ),
        (
            &[
                ("GAVEL_DATABASE_URL", "postgres://gavel@127.0.0.1:1/x"),
                ("GAVEL_JWT_SECRET", SECRET),
                ("GAVEL_WEBHOOK_URLS", "https://market.example/hooks"),
                ("GAVEL_WEBHOOK_SECRET", "whsec_not-base64!"),
            ],
            "GAVEL_WEBHOOK_SECRET",
        ),
    ];
    for (vars, name) in cases {
        for command in ["serve", "migrate"] {
            let out = gavel()
                .arg(command)
                .envs(vars.iter().copied())
                .output()
                .unwrap();
            assert!(!out.status.success(), "{command} with bad {name} must fail");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert!(stderr.contains(name), "{stderr} names {name}");
        }
    }
}

#[test]
fn token_prints_a_verifiable_jwt_with_roles() {
    let out = gavel()
        .args([
            "token", "--sub", "alice", "--role", "seller", "--role", "admin", "--ttl", "60",
        ])
        .env("GAVEL_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert_success(&out);
    let token = String::from_utf8(out.stdout).unwrap();
    let user = JwtKeys::new(SECRET, "gavel").verify(token.trim()).unwrap();
    assert_eq!(user.id.as_str(), "alice");
    assert!(user.has(Role::Seller) && user.is_admin());

    let missing = gavel().args(["token", "--sub", "alice"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("GAVEL_JWT_SECRET"));
    let bad_role = gavel()
        .args(["token", "--sub", "alice", "--role", "root"])
        .env("GAVEL_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!bad_role.status.success());
}

#[tokio::test]
async fn migrate_brings_an_empty_database_to_ready() {
    let cluster = cluster();
    let name = format!("empty_{}", uuid::Uuid::new_v4().simple());
    connect(&cluster.url("postgres"))
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = cluster.url(&name);

    // Not migrated yet: the server runs but is not ready.
    let app = TestApp::spawn_on(&url, |_| {}).await;
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    let migrate = || {
        let out = gavel()
            .arg("migrate")
            .env("GAVEL_DATABASE_URL", &url)
            .env("GAVEL_JWT_SECRET", SECRET)
            .output()
            .unwrap();
        assert_success(&out);
    };
    migrate();
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    // Migrating again is a no-op.
    migrate();
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
}

#[tokio::test]
async fn gavel_dev_serves_the_printed_demo_and_stops_its_cluster_on_ctrl_c() {
    cluster(); // fail early with the install hint when PostgreSQL is missing
    let workdir = std::env::temp_dir().join(format!("gavel-dev-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&workdir).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gavel"))
        .arg("dev")
        .current_dir(&workdir)
        .env("GAVEL_LISTEN", "127.0.0.1:0")
        .env("GAVEL_ADMIN_LISTEN", "127.0.0.1:0")
        .env("GAVEL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("Press Ctrl-C");
            printed.push(line);
            if done {
                return;
            }
        }
        panic!("gavel dev exited early: {printed:?}");
    })
    .await
    .expect("gavel dev started in time");
    let text = printed.join("\n");
    let api = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("API:"))
        .map(|s| s.trim().to_owned())
        .expect("API URL printed");
    let token = text
        .split("Authorization: Bearer ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("token printed")
        .to_owned();
    let auction_id = text
        .split("/api/auctions/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("demo auction printed")
        .to_owned();

    let http = http_client();
    let response = http
        .post(format!("{api}/api/auctions/{auction_id}/bids"))
        .bearer_auth(&token)
        .header("Idempotency-Key", new_key())
        .header("Prefer", "wait=5")
        .json(&json!({"amount": 1500}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "leading");
    // Reads come from the streaming replica once it has replayed the bid.
    eventually(
        Duration::from_secs(10),
        "the replica serves the demo auction",
        || async {
            let response = http
                .get(format!("{api}/api/auctions/{auction_id}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let from = header(&response, "gavel-read-from");
            let auction: Value = response.json().await.unwrap();
            (from == "replica" && auction["bid_count"] == 1).then_some(())
        },
    )
    .await;

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("gavel dev stopped after Ctrl-C")
        .unwrap();
    assert!(status.success(), "gavel dev exited with {status}");
    for server in ["primary", "replica"] {
        let pid_file = workdir.join(format!(".gavel/dev/{server}/data/postmaster.pid"));
        assert!(
            !pid_file.exists(),
            "the private PostgreSQL {server} was stopped"
        );
    }
    std::fs::remove_dir_all(&workdir).unwrap();
}
