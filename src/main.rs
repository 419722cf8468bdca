//! The `quotad` command: `serve` runs the daemon, `check` asks it once.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quotad::client::Client;
use quotad::clock::Clock;
use quotad::config::Config;
use quotad::daemon::Daemon;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "quotad",
    version,
    about = "Rate-limiting sidecar: MessagePack over a Unix socket, decided in Redis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (without a config file: in-memory backend, built-in `default` policy).
    Serve {
        /// The TOML config file (see docs/config.md).
        #[arg(long, env = "QUOTAD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Ask a running quotad for one decision. Exit status: 0 allowed, 1 denied, 2 error.
    Check {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        key: String,
        /// The policy (default: the one named `default`).
        #[arg(long)]
        policy: Option<String>,
        /// Units to charge; 0 peeks without charging.
        #[arg(long, default_value_t = 1)]
        cost: u64,
        /// The daemon's socket (default: the config's, else the default path).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, env = "QUOTAD_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config).map(|()| ExitCode::SUCCESS),
        Command::Check {
            tenant,
            key,
            policy,
            cost,
            socket,
            config,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(check(tenant, key, policy, cost, socket, config))),
    };
    result.unwrap_or_else(|e| {
        eprintln!("quotad: {e:#}");
        ExitCode::from(2)
    })
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::builtin(),
    })
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(path.as_ref())?;
    let runtime = match config.server.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(run(config, path))
}

async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let backend = match &config.redis {
        None => "memory".to_owned(),
        Some(r) => match &r.url {
            Some(url) => redact(url),
            None if r.cluster.is_empty() => format!("sentinel {}", r.sentinels.join(",")),
            None => format!("cluster {}", r.cluster.join(",")),
        },
    };
    let daemon = Daemon::start(config, Clock::System)?;
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    quotad::shutdown::listen(shutdown.clone(), reload_tx).context("installing signal handlers")?;
    tracing::info!(socket = %daemon.socket().display(), backend, version = env!("CARGO_PKG_VERSION"), "quotad ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    daemon.run(shutdown, reload_rx, path).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    Ok(())
}

/// A Redis URL without its password, for the log.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

async fn check(
    tenant: String,
    key: String,
    policy: Option<String>,
    cost: u64,
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let socket = match socket {
        Some(s) => s,
        None => load(config.as_ref())?.server.socket,
    };
    let client = Client::connect(&socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let d = client.check(&tenant, &key, policy.as_deref(), cost).await?;
    println!(
        "allowed={} limit={} remaining={} reset_ms={} retry_after_ms={} rule={} degraded={}",
        d.allowed, d.limit, d.remaining, d.reset_ms, d.retry_after_ms, d.rule, d.degraded
    );
    Ok(if d.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
