//! The `gavel` command line: `serve`, `migrate`, `dev` and `token`. `dev`
//! exists only with the `dev` feature (on by default), so a serve-only build
//! (`--no-default-features`) carries no development infrastructure.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::auth::{JwtKeys, Role};
use crate::config::{Config, MIN_JWT_SECRET_LEN};
use crate::{db, server, telemetry};

/// Gavel: auction bidding backend.
#[derive(Debug, Parser)]
#[command(name = "gavel", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `gavel serve --help` adds about its configuration.
const SERVE_HELP: &str = "Configured by GAVEL_* environment variables (README.md lists them all).

GAVEL_BID_PATH chooses how a bid is written:
  log          the append-only bid log, resolved in the background (default)
  row_lock     load-test baseline: the classic transaction that locks the
               auction row for every bid, a round trip per statement (seven
               or eight of them under the lock)
  row_lock_fn  load-test baseline: the same locked transaction as one
               PL/pgSQL call, one round trip per bid
  optimistic   load-test baseline: read, apply the rules, compare-and-set on
               the auction's version from every request, retried up to 5
               times, then 503
The baselines exist to compare Gavel with the classic designs; never use
them in production.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API, the resolver and the admin listener.
    #[command(after_help = SERVE_HELP)]
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Zero-configuration local run on a private PostgreSQL.
    #[cfg(feature = "dev")]
    Dev,
    /// Webhook deliveries: replay the failed ones.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Print a JWT signed with GAVEL_JWT_SECRET (development and load tests).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// A role to grant (bidder, seller, admin); repeatable.
        #[arg(long = "role")]
        roles: Vec<Role>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// Queue failed deliveries again as new (due now, retried for another
    /// 24 h), with the same webhook-id; prints how many.
    Replay {
        /// Only the deliveries to this URL (as configured); every URL without it.
        #[arg(long)]
        url: Option<String>,
    },
}

/// Parses the command line and runs the chosen command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Token { sub, roles, ttl } = &cli.command {
        return print_token(sub, roles, *ttl);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve().await,
            Command::Migrate => migrate().await,
            Command::Webhooks(WebhooksCommand::Replay { url }) => replay(url.as_deref()).await,
            #[cfg(feature = "dev")]
            Command::Dev => crate::dev::run().await,
            Command::Token { .. } => unreachable!("handled above"),
        }
    })
}

fn load_config() -> anyhow::Result<Config> {
    Config::from_env().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

async fn serve() -> anyhow::Result<()> {
    let config = load_config()?;
    telemetry::init_tracing(&config.telemetry.log_filter, config.telemetry.log_json);
    server::Server::bind(config)
        .await?
        .run_until_signalled()
        .await
}

async fn migrate() -> anyhow::Result<()> {
    let config = load_config()?;
    telemetry::init_tracing(&config.telemetry.log_filter, config.telemetry.log_json);
    db::migrate(&config.database_url).await?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn replay(url: Option<&str>) -> anyhow::Result<()> {
    let config = load_config()?;
    telemetry::init_tracing(&config.telemetry.log_filter, config.telemetry.log_json);
    let url = url.map(normalise_url).transpose()?;
    let settings = db::PoolSettings::new(&config, 1, "gavel-cli");
    let pool = db::build_pool(&config.database_url, "cli", &settings)?;
    let client = pool
        .get()
        .await
        .context("connecting to GAVEL_DATABASE_URL")?;
    let replayed = db::webhooks::replay_failed(&client, url.as_deref()).await?;
    println!("{replayed} failed deliveries queued again");
    Ok(())
}

/// A URL as the configuration stores it (`--url` may omit the trailing `/`).
fn normalise_url(text: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(text).map_err(|e| anyhow::anyhow!("--url: {e}"))?;
    Ok(url.to_string())
}

fn print_token(sub: &str, roles: &[Role], ttl: u64) -> anyhow::Result<()> {
    let secret = std::env::var("GAVEL_JWT_SECRET").unwrap_or_default();
    if secret.len() < MIN_JWT_SECRET_LEN {
        anyhow::bail!(
            "GAVEL_JWT_SECRET: must be set to at least {MIN_JWT_SECRET_LEN} bytes to sign tokens"
        );
    }
    let audience = std::env::var("GAVEL_JWT_AUDIENCE")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "gavel".into());
    crate::domain::UserId::parse(sub).map_err(|e| anyhow::anyhow!("--sub: {e}"))?;
    println!("{}", JwtKeys::new(&secret, &audience).mint(sub, roles, ttl));
    Ok(())
}
