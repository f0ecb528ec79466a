//! Private, throwaway PostgreSQL clusters (a primary and streaming replicas)
//! run from the machine's PostgreSQL server binaries, for `gavel dev`, the
//! integration tests and the load tests. It is development and test
//! infrastructure, a crate of its own so that a serve-only build of Gavel
//! (`--no-default-features`) does not link it.
//!
//! Each cluster lives entirely under one directory (`data/`, `sock/`,
//! `postgres.log`), listens on 127.0.0.1 only and never on 5432, so it cannot
//! disturb a system PostgreSQL. Because `Drop` does not run when the owning
//! process is SIGKILLed, every cluster also gets a watchdog: a tiny `sh`
//! child blocked reading a pipe that only the owner holds; when the pipe
//! reaches EOF the watchdog stops the server and removes the directory.
//! PostgreSQL refuses to run as root, so as root the server tools run as the
//! `postgres` OS user through `runuser`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};

/// Superuser created by `initdb`; trusted without a password.
pub const SUPERUSER: &str = "gavel";

const HOST: &str = "127.0.0.1";
const SYSTEM_PORT: u16 = 5432;
const OS_USER: &str = "postgres";
const START_TIMEOUT_SECS: &str = "60";
const CONF_FILE: &str = "gavel.conf";
const CONF_INCLUDE: &str = "include = 'gavel.conf'";
/// Entries this module creates in a cluster directory; a non-reused directory
/// holding anything else is refused rather than wiped.
const OWNED_ENTRIES: [&str; 3] = ["data", "sock", "postgres.log"];
/// Settings this module owns because `port()`, `host()` and the socket path depend on them.
const RESERVED_SETTINGS: [&str; 3] = ["port", "listen_addresses", "unix_socket_directories"];
/// Run as the server's OS user: can it create files in `$1`?
const CAN_ENTER_SCRIPT: &str = r#"test -w "$1" && test -x "$1""#;
const LOG_TAIL_LINES: usize = 40;
/// `sun_path` is 108 bytes including the NUL terminator.
const MAX_SOCKET_PATH: usize = 107;

/// Where PostgreSQL's server binaries are: `pg_config --bindir`, then `initdb` on `PATH`, then the highest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Result<PathBuf> {
    let is_server_dir = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();

    // pg_config may come from libpq-dev alone, so its bindir must be checked for the server tools.
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && is_server_dir(&dir) {
            return Ok(dir);
        }
    }

    if let Some(path) = std::env::var_os("PATH") {
        for entry in std::env::split_paths(&path) {
            // Resolve symlinks such as /usr/local/bin/initdb so the sibling tools are found.
            if let Ok(initdb) = fs::canonicalize(entry.join("initdb")) {
                if let Some(dir) = initdb.parent().filter(|dir| is_server_dir(dir)) {
                    return Ok(dir.to_path_buf());
                }
            }
        }
    }

    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            is_server_dir(&bin).then_some((version, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return Ok(dir);
    }

    bail!(
        "no PostgreSQL server binaries (initdb, pg_ctl) were found; looked at `pg_config --bindir`, \
         `initdb` on PATH and /usr/lib/postgresql/*/bin; install them with: apt-get install -y postgresql"
    )
}

/// How to create or reuse one cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Directory holding this cluster's `data/`, `sock/` and `postgres.log`; created if missing.
    pub dir: PathBuf,
    /// Port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// Extra `postgresql.conf` settings, e.g. `("fsync", "off")`.
    pub settings: Vec<(String, String)>,
    /// Start an already initialized data directory instead of wiping it, and keep it on drop.
    pub reuse: bool,
}

impl ClusterOptions {
    /// Options for a throwaway cluster in `dir` on a free port.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            port: None,
            settings: Vec::new(),
            reuse: false,
        }
    }
}

/// A running (or stopped) private PostgreSQL cluster, stopped and cleaned up on drop.
pub struct PgCluster {
    tools: Tools,
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    reuse: bool,
    running: bool,
    watchdog: Option<Watchdog>,
}

impl PgCluster {
    /// Initializes (unless reused) and starts a primary; blocks until it accepts connections.
    pub fn start(options: ClusterOptions) -> Result<PgCluster> {
        let started = Instant::now();
        let tools = Tools::detect(find_bin_dir()?)?;
        let mut cluster = Self::prepare(tools, &options)?;
        if !(options.reuse && cluster.is_initialized()) {
            cluster.initdb()?;
        }
        cluster.boot(&options)?;
        tracing::info!(
            port = cluster.port,
            dir = %cluster.dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "PostgreSQL primary started"
        );
        Ok(cluster)
    }

    /// Creates a streaming replica of this primary in `options.dir` and starts it; blocks until it accepts connections.
    pub fn start_replica(&self, options: ClusterOptions) -> Result<PgCluster> {
        if !self.running {
            bail!(
                "cannot start a replica of the stopped cluster in {}",
                self.dir.display()
            );
        }
        let started = Instant::now();
        let mut replica = Self::prepare(self.tools.clone(), &options)?;
        if !(options.reuse && replica.is_initialized()) {
            replica.remove_data()?;
            let mut cmd = replica.tools.server_cmd("pg_basebackup");
            let primary_port = self.port.to_string();
            cmd.current_dir(&replica.dir)
                .args(["-h", HOST, "-p", &primary_port, "-U", SUPERUSER, "-D"])
                .arg(&replica.data)
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-w"]);
            run(&mut cmd, "pg_basebackup")?;
        }
        replica.boot(&options)?;
        tracing::info!(
            port = replica.port,
            primary_port = self.port,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "PostgreSQL replica started"
        );
        Ok(replica)
    }

    /// Port the cluster listens on at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host the cluster listens on: always `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// Connection URL for `database` as the trusted superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    /// The cluster's data directory (`<dir>/data`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The postmaster's process id, from `postmaster.pid`, while it runs.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pid_file = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// Stops the server with `pg_ctl stop -m fast`; does nothing if it is already stopped.
    pub fn stop(&mut self) -> Result<()> {
        if self.running {
            self.pg_ctl_stop("fast")?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts the server again after `stop`, with the same data and port.
    pub fn start_again(&mut self) -> Result<()> {
        if !self.running {
            self.pg_ctl_start()?;
        }
        Ok(())
    }

    /// Runs `sql` with `psql -X -q -A -t -v ON_ERROR_STOP=1` against `database` and returns its trimmed output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let psql = self.tools.bin_dir.join("psql");
        let mut cmd = Command::new(if psql.is_file() {
            psql.as_os_str()
        } else {
            OsStr::new("psql")
        });
        clean_env(&mut cmd);
        let port = self.port.to_string();
        cmd.stdin(Stdio::null())
            .args(["-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", HOST, "-p", &port, "-U", SUPERUSER])
            .args(["-d", database, "-c", sql]);
        let out = run(&mut cmd, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates the directory, refusing to wipe anything this module did not create, and arms the watchdog.
    fn prepare(tools: Tools, options: &ClusterOptions) -> Result<PgCluster> {
        let dir = std::path::absolute(&options.dir)
            .with_context(|| format!("invalid cluster directory {}", options.dir.display()))?;
        if let Some(port) = options.port {
            check_port(port)?;
        }
        for (name, _) in &options.settings {
            if RESERVED_SETTINGS.contains(&name.as_str()) {
                bail!(
                    "setting {name:?} is managed by pg_cluster (set the port through ClusterOptions::port)"
                );
            }
        }
        if !options.reuse && dir.exists() {
            wipe_owned_dir(&tools, &dir)?;
        }
        let created = !dir.exists();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = match fs::canonicalize(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|dir| setup_dir(&tools, dir))
        {
            Ok(dir) => dir,
            Err(err) => {
                // Leave nothing behind when the directory is unusable, unless it is a kept one.
                if created || !options.reuse {
                    let _ = fs::remove_dir_all(&dir);
                }
                return Err(err);
            }
        };

        let data = dir.join("data");
        // A kept cluster may still be served by another owner (a second
        // `gavel dev`): refuse before arming a watchdog that would stop it.
        if options.reuse && data.join("PG_VERSION").is_file() && server_running(&tools, &data) {
            bail!(
                "a PostgreSQL server is already running in {} (is another `gavel dev` running?)",
                data.display()
            );
        }
        let watchdog = Watchdog::spawn(&tools, &data, (!options.reuse).then_some(dir.as_path()))?;
        Ok(PgCluster {
            tools,
            log: dir.join("postgres.log"),
            data,
            dir,
            port: 0,
            reuse: options.reuse,
            running: false,
            watchdog: Some(watchdog),
        })
    }

    fn is_initialized(&self) -> bool {
        self.data.join("PG_VERSION").is_file()
    }

    fn remove_data(&self) -> Result<()> {
        if self.data.exists() {
            fs::remove_dir_all(&self.data)
                .with_context(|| format!("cannot remove {}", self.data.display()))?;
        }
        Ok(())
    }

    fn initdb(&mut self) -> Result<()> {
        self.remove_data()?;
        let mut cmd = self.tools.server_cmd("initdb");
        cmd.current_dir(&self.dir).arg("-D").arg(&self.data).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run(&mut cmd, "initdb")?;
        Ok(())
    }

    /// Writes the configuration and starts the server, retrying on another free port if the chosen one was taken meanwhile.
    fn boot(&mut self, options: &ClusterOptions) -> Result<()> {
        let attempts = if options.port.is_some() { 1 } else { 3 };
        let mut attempt = 1;
        loop {
            self.port = match options.port {
                Some(port) => port,
                None => free_port()?,
            };
            self.write_conf(&options.settings)?;
            match self.pg_ctl_start() {
                Err(err) if attempt < attempts && format!("{err:#}").contains("could not bind") => {
                    tracing::debug!(
                        port = self.port,
                        "port taken while starting PostgreSQL; retrying"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn write_conf(&self, extra: &[(String, String)]) -> Result<()> {
        let main_conf = self.data.join("postgresql.conf");
        let current = fs::read_to_string(&main_conf)
            .with_context(|| format!("cannot read {}", main_conf.display()))?;
        if !current.lines().any(|line| line.trim() == CONF_INCLUDE) {
            let mut file = fs::OpenOptions::new().append(true).open(&main_conf)?;
            writeln!(file, "\n{CONF_INCLUDE}")?;
        }

        let sock = self.dir.join("sock");
        let port = self.port.to_string();
        let defaults = [
            ("listen_addresses", HOST),
            ("port", port.as_str()),
            (
                "unix_socket_directories",
                sock.to_str().context("socket path is not UTF-8")?,
            ),
            ("wal_level", "replica"),
            ("max_wal_senders", "10"),
            ("hot_standby", "on"),
            ("max_connections", "200"),
        ];
        let mut text = String::from(
            "# Written by gavel's pg_cluster on every start; edits are overwritten.\n",
        );
        let extra = extra.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in defaults.into_iter().chain(extra) {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                bail!("invalid PostgreSQL setting name {name:?}");
            }
            if value.contains(['\n', '\r', '\0']) {
                bail!("value of PostgreSQL setting {name} contains a line break");
            }
            let quoted = value.replace('\\', "\\\\").replace('\'', "''");
            let _ = writeln!(text, "{name} = '{quoted}'");
        }
        let path = self.data.join(CONF_FILE);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        self.tools.chown_file(&path)
    }

    fn pg_ctl_start(&mut self) -> Result<()> {
        let log_start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.tools.server_cmd("pg_ctl");
        cmd.current_dir(&self.dir)
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", START_TIMEOUT_SECS, "start"]);
        // pg_ctl execs postgres with stdio redirected to /dev/null and the log
        // file, so capturing pg_ctl's own output cannot leak our pipes.
        let out = cmd.output().context("cannot run pg_ctl")?;
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        // After a timeout the postmaster may still be coming up; do not leave it behind.
        let _ = self.pg_ctl_stop("immediate");
        Err(anyhow!(
            "pg_ctl start failed for {} ({}): {}\n--- {} ---\n{}",
            self.data.display(),
            out.status,
            output_text(&out),
            self.log.display(),
            log_tail(&self.log, log_start)
        ))
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        let mut cmd = self.tools.server_cmd("pg_ctl");
        cmd.current_dir(&self.dir).arg("-D").arg(&self.data);
        cmd.args(["-m", mode, "-w", "-t", START_TIMEOUT_SECS, "stop"]);
        match run(&mut cmd, "pg_ctl stop") {
            Err(_) if !server_running(&self.tools, &self.data) => Ok(()),
            other => other.map(drop),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A reused cluster (gavel dev) is shut down cleanly to avoid crash recovery next time.
        let mode = if self.reuse { "fast" } else { "immediate" };
        let stopped = !self.running || self.pg_ctl_stop(mode).is_ok();
        if let Some(watchdog) = self.watchdog.take() {
            // If our stop failed, let the watchdog try once more instead of disarming it.
            watchdog.finish(stopped);
        }
        if !self.reuse && stopped {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The server binaries plus the OS identity they must run as.
#[derive(Clone)]
struct Tools {
    bin_dir: PathBuf,
    /// `Some((uid, gid))` of the `postgres` user when we are root.
    run_as: Option<(u32, u32)>,
}

impl Tools {
    fn detect(bin_dir: PathBuf) -> Result<Self> {
        let run_as = if effective_uid()? == 0 {
            Some(server_user_ids()?)
        } else {
            None
        };
        Ok(Self { bin_dir, run_as })
    }

    /// A command for a server tool, wrapped in `runuser` when we are root.
    fn server_cmd(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        let mut cmd = if self.run_as.is_some() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", OS_USER, "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        };
        clean_env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn give_to_server_user(&self, dir: &Path) -> Result<()> {
        let Some((uid, gid)) = self.run_as else {
            return Ok(());
        };
        let mut chown = Command::new("chown");
        chown
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(dir)
            .stdin(Stdio::null());
        run(&mut chown, "chown")?;
        let mut probe = Command::new("runuser");
        probe
            .args(["-u", OS_USER, "--", "sh", "-c", CAN_ENTER_SCRIPT, "sh"])
            .arg(dir)
            .current_dir("/")
            .stdin(Stdio::null());
        if !probe.output().is_ok_and(|out| out.status.success()) {
            bail!(
                "the {OS_USER} OS user cannot reach {}; pick a directory whose parents it may traverse (e.g. under /tmp)",
                dir.display()
            );
        }
        Ok(())
    }

    fn chown_file(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {}", path.display()))?;
        }
        Ok(())
    }
}

/// The watchdog child: it blocks reading a pipe only we hold, and cleans up when the pipe closes without a disarm.
struct Watchdog {
    child: Child,
    stdin: ChildStdin,
}

// Ignoring terminal and termination signals keeps the watchdog alive through
// a Ctrl-C or group SIGTERM that kills the owner, which is when it is needed.
const WATCHDOG_SCRIPT: &str = r#"
trap '' HUP INT QUIT TERM
read -r word
[ "$word" = disarm ] && exit 0
if [ -n "$1" ]; then
    runuser -u "$1" -- "$2" -D "$3" -m immediate -w stop
else
    "$2" -D "$3" -m immediate -w stop
fi
[ -n "$4" ] && rm -rf -- "$4"
exit 0
"#;

impl Watchdog {
    fn spawn(tools: &Tools, data: &Path, remove: Option<&Path>) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("pg_cluster_watchdog")
            .arg(if tools.run_as.is_some() { OS_USER } else { "" })
            .arg(tools.bin_dir.join("pg_ctl"))
            .arg(data)
            .arg(remove.map_or(OsStr::new(""), Path::as_os_str))
            .current_dir("/")
            .stdin(Stdio::piped())
            // Inheriting our stdout/stderr would keep `cargo test`'s capture pipes open.
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        clean_env(&mut cmd);
        let mut child = cmd
            .spawn()
            .context("cannot spawn the pg_cluster watchdog (sh)")?;
        let stdin = child.stdin.take().context("watchdog has no stdin pipe")?;
        Ok(Self { child, stdin })
    }

    /// Disarms the watchdog (or, if `disarm` is false, lets it clean up) and waits for it to exit.
    fn finish(mut self, disarm: bool) {
        if disarm {
            let _ = self.stdin.write_all(b"disarm\n");
        }
        drop(self.stdin);
        // Waiting matters: a late watchdog must not stop or delete a new cluster in the same directory.
        let _ = self.child.wait();
    }
}

/// Creates the socket directory and hands `dir` to the server's OS user; returns `dir`.
fn setup_dir(tools: &Tools, dir: PathBuf) -> Result<PathBuf> {
    let sock = dir.join("sock");
    fs::create_dir_all(&sock)?;
    let socket_len = sock.join(".s.PGSQL.65535").as_os_str().len();
    if socket_len > MAX_SOCKET_PATH {
        bail!(
            "cluster directory {} is too long for a Unix socket path ({socket_len} > {MAX_SOCKET_PATH} bytes); use a shorter one",
            dir.display()
        );
    }
    tools.give_to_server_user(&dir)?;
    Ok(dir)
}

/// Removes a non-reused cluster directory, but only if everything in it is ours.
fn wipe_owned_dir(tools: &Tools, dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        if !OWNED_ENTRIES.iter().any(|owned| name == OsStr::new(owned)) {
            bail!(
                "refusing to wipe {}: it holds {:?}, which pg_cluster did not create (use reuse=true or an empty directory)",
                dir.display(),
                name
            );
        }
    }
    let data = dir.join("data");
    if data.join("postmaster.pid").exists() {
        let mut cmd = tools.server_cmd("pg_ctl");
        cmd.current_dir("/")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = cmd.output();
    }
    fs::remove_dir_all(dir).with_context(|| format!("cannot wipe {}", dir.display()))
}

fn server_running(tools: &Tools, data: &Path) -> bool {
    let mut cmd = tools.server_cmd("pg_ctl");
    cmd.current_dir("/").arg("-D").arg(data).arg("status");
    // Exit status 3 means "not running"; anything else is treated as running to stay on the safe side.
    cmd.output()
        .map_or(true, |out| out.status.code() != Some(3))
}

/// Runs `cmd` to completion, failing with its output if it exits non-zero.
fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, output_text(&out));
    }
    Ok(out)
}

fn output_text(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    text.trim().to_string()
}

/// Drops libpq's `PG*` variables so the caller's environment cannot redirect or break our commands.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

/// The last lines written to the log since byte `from`.
fn log_tail(log: &Path, from: u64) -> String {
    let mut text = String::new();
    let read = fs::File::open(log).and_then(|mut file| {
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if let Err(err) = read {
        return format!("(cannot read log: {err})");
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

fn check_port(port: u16) -> Result<()> {
    if port == SYSTEM_PORT || port == 0 {
        bail!("port {port} cannot be used for a private cluster (5432 belongs to the system PostgreSQL)");
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    for _ in 0..10 {
        let listener = TcpListener::bind((HOST, 0)).context("cannot bind 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if port != SYSTEM_PORT {
            return Ok(port);
        }
    }
    bail!("no free loopback port found")
}

fn effective_uid() -> Result<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        // "Uid:\treal\teffective\tsaved\tfs"
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    id_number(&["-u"]).context("cannot determine the effective uid (`id -u`)")
}

fn server_user_ids() -> Result<(u32, u32)> {
    match (id_number(&["-u", OS_USER]), id_number(&["-g", OS_USER])) {
        (Ok(uid), Ok(gid)) => Ok((uid, gid)),
        _ => bail!(
            "running as root, but PostgreSQL refuses to run as root and there is no `{OS_USER}` OS user \
             to run it as; create one (adduser --system --group {OS_USER}) or run as a non-root user"
        ),
    }
}

fn id_number(args: &[&str]) -> Result<u32> {
    let out = Command::new("id")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("id {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encodes_database_names() {
        assert_eq!(percent_encode("gavel_test-1"), "gavel_test-1");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
