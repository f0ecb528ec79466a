//! The server a bench run measures, started and stopped: Gavel (`gavel
//! serve` as a child process, or inside this process for the smoke tests)
//! or the HTTP floor ([`crate::floor`]) the same way, each on free ports,
//! ready before the run and stopped after it.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use crate::cpu::CpuWatch;
use crate::floor;
use crate::generator::Target;

/// How Gavel (and the HTTP floor) is started for each mode.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// `gavel serve` from this binary, as a child process (its RSS is its
    /// own); the floor as `gavel-loadtest floor`, a child of this one.
    Process(PathBuf),
    /// Inside this process (smoke tests: no binary to find).
    InProcess,
}

impl Launcher {
    /// Migrates the database at `url` to the schema of the Gavel this
    /// launcher starts: its binary's `gavel migrate` (so each build of a
    /// before/after pair runs on its own schema), or this build's
    /// migrations in process.
    pub(crate) async fn migrate(&self, url: &str) -> anyhow::Result<()> {
        let Launcher::Process(binary) = self else {
            return gavel::db::migrate(url).await;
        };
        let mut settings = with_environment(HashMap::new());
        settings.insert("GAVEL_DATABASE_URL".into(), url.into());
        let binary = binary.clone();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(&binary)
                .arg("migrate")
                .envs(&settings)
                .output()
        })
        .await?
        .context("running gavel migrate")?;
        if !output.status.success() {
            bail!(
                "gavel migrate failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

/// A running server under test: Gavel or the HTTP floor.
pub(crate) struct Server {
    api: SocketAddr,
    /// Gavel's admin listener (`/metrics`); the floor has none.
    admin: Option<SocketAddr>,
    secret: String,
    audience: String,
    running: Running,
}

enum Running {
    Process(Child),
    InProcess(
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ),
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `settings` with a fresh JWT secret and quiet logs unless set, and the
/// environment's `GAVEL_*` variables over them, except those the bench
/// owns (the databases, the bid path, the listeners, the resolver).
fn with_environment(mut settings: HashMap<String, String>) -> HashMap<String, String> {
    let secret = format!("loadtest-{}", uuid::Uuid::new_v4().simple());
    settings.entry("GAVEL_JWT_SECRET".into()).or_insert(secret);
    settings
        .entry("GAVEL_LOG".into())
        .or_insert_with(|| "warn".into());
    for (name, value) in std::env::vars() {
        let owned = matches!(
            name.as_str(),
            "GAVEL_DATABASE_URL"
                | "GAVEL_REPLICA_URLS"
                | "GAVEL_BID_PATH"
                | "GAVEL_LISTEN"
                | "GAVEL_ADMIN_LISTEN"
                | "GAVEL_RESOLVER"
        );
        if name.starts_with("GAVEL_") && !owned {
            settings.insert(name, value);
        }
    }
    settings
}

impl Server {
    /// Starts Gavel with `settings` (the environment's `GAVEL_*` win over
    /// them) and waits until it is ready.
    pub(crate) async fn gavel(
        launcher: &Launcher,
        settings: HashMap<String, String>,
    ) -> anyhow::Result<Server> {
        let mut settings = with_environment(settings);
        let running = match launcher {
            Launcher::Process(binary) => {
                settings.insert("GAVEL_LISTEN".into(), format!("127.0.0.1:{}", free_port()?));
                let admin = format!("127.0.0.1:{}", free_port()?);
                settings.insert("GAVEL_ADMIN_LISTEN".into(), admin);
                spawn(Command::new(binary).arg("serve").envs(&settings))?
            }
            Launcher::InProcess => gavel_in_process(&mut settings).await?,
        };
        let server = Server {
            api: settings["GAVEL_LISTEN"].parse()?,
            admin: Some(settings["GAVEL_ADMIN_LISTEN"].parse()?),
            secret: settings["GAVEL_JWT_SECRET"].clone(),
            audience: (settings.get("GAVEL_JWT_AUDIENCE").cloned())
                .unwrap_or_else(|| "gavel".into()),
            running,
        };
        server.ready().await
    }

    /// Starts the HTTP floor and waits until it is ready.
    pub(crate) async fn floor(launcher: &Launcher) -> anyhow::Result<Server> {
        let (api, running) = match launcher {
            Launcher::Process(_) => {
                let api: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
                let this = std::env::current_exe()?;
                let listen = api.to_string();
                (
                    api,
                    spawn(Command::new(this).args(["floor", "--listen", &listen]))?,
                )
            }
            Launcher::InProcess => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let api = listener.local_addr()?;
                let shutdown = CancellationToken::new();
                let handle = tokio::spawn(floor::serve(listener, shutdown.clone()));
                (api, Running::InProcess(shutdown, handle))
            }
        };
        let server = Server {
            api,
            admin: None,
            secret: format!("floor-{}", uuid::Uuid::new_v4().simple()),
            audience: "gavel".into(),
            running,
        };
        server.ready().await
    }

    /// Waits for `/readyz`; a server that never gets there is stopped, so
    /// none outlives the run that failed to start it.
    async fn ready(self) -> anyhow::Result<Server> {
        if let Err(e) = self.wait_ready().await {
            let _ = self.stop().await;
            return Err(e);
        }
        Ok(self)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("http://{}/readyz", self.api);
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(&url).timeout(Duration::from_secs(1)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the server did not become ready at {url} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where the generator sends its requests, and how it signs them.
    pub(crate) fn target(&self) -> Target {
        Target {
            api: format!("http://{}", self.api),
            metrics: self.admin.map(|admin| format!("http://{admin}/metrics")),
            jwt_secret: self.secret.clone(),
            jwt_audience: self.audience.clone(),
            disk_probe: None,
            cpu: CpuWatch::default(),
            generator_nice: 0,
        }
    }

    /// The API's base URL.
    pub(crate) fn api(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The server's process id (this process's when it runs in it).
    pub(crate) fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Process(child) => Some(child.id()),
            Running::InProcess(..) => Some(std::process::id()),
        }
    }

    /// Stops the server: SIGTERM to a process (Gavel drains in-flight
    /// requests), the shutdown token to one in this process.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        match self.running {
            Running::Process(mut child) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                tokio::task::spawn_blocking(move || child.wait()).await??;
            }
            Running::InProcess(shutdown, handle) => {
                shutdown.cancel();
                handle.await??;
            }
        }
        Ok(())
    }
}

/// Starts `command` as a child with no input or output but its errors.
fn spawn(command: &mut Command) -> anyhow::Result<Running> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    Ok(Running::Process(child))
}

/// Binds Gavel inside this process and files the addresses it bound.
async fn gavel_in_process(settings: &mut HashMap<String, String>) -> anyhow::Result<Running> {
    settings.insert("GAVEL_LISTEN".into(), "127.0.0.1:0".into());
    settings.insert("GAVEL_ADMIN_LISTEN".into(), "127.0.0.1:0".into());
    let config = gavel::config::Config::from_lookup(|name| settings.get(name).cloned())?;
    let server = gavel::server::Server::bind(config).await?;
    settings.insert("GAVEL_LISTEN".into(), server.api_addr().to_string());
    settings.insert("GAVEL_ADMIN_LISTEN".into(), server.admin_addr().to_string());
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    Ok(Running::InProcess(shutdown, handle))
}
