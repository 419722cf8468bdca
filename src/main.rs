//! The `quotad` command: `serve` runs the daemon, `check` asks it once,
//! `tenant` manages tenants' plans through it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quotad::client::Client;
use quotad::clock::Clock;
use quotad::config::Config;
use quotad::config::TenantRecord;
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
        /// Listen here instead of at the config's `server.socket`.
        #[arg(long, env = "QUOTAD_SOCKET")]
        socket: Option<PathBuf>,
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
        #[command(flatten)]
        at: Socket,
    },
    /// Tenants' plans, through the running daemon (admin ops: for the users
    /// in `admin.allowed_uids`). `set` and `delete` need the `redis` source.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
        #[command(flatten)]
        at: Socket,
    },
}

/// Where the running daemon is.
#[derive(clap::Args)]
struct Socket {
    /// The daemon's socket (default: the config's, else the default path).
    #[arg(long, env = "QUOTAD_SOCKET", global = true)]
    socket: Option<PathBuf>,
    #[arg(long, env = "QUOTAD_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Show a tenant's plan and own limits, as the source has them.
    Get { tenant: String },
    /// Put a tenant on a plan, with limits of its own
    /// (`--limit api.burst.capacity=5000`, repeatable). Takes effect at once.
    Set {
        tenant: String,
        #[arg(long)]
        plan: String,
        #[arg(long = "limit", value_parser = parse_limit)]
        limits: Vec<(String, f64)>,
    },
    /// Remove a tenant's record: it falls back to the default plan.
    Delete { tenant: String },
    /// List the tenants the source knows.
    List,
}

fn parse_limit(s: &str) -> Result<(String, f64), String> {
    let (path, value) = s
        .split_once('=')
        .ok_or("expected <policy>.<rule>.<parameter>=<number>")?;
    let value = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number"))?;
    Ok((path.to_owned(), value))
}

fn main() -> ExitCode {
    // An empty variable means unset, as in the client shims (clap would
    // take it as an empty value).
    for var in ["QUOTAD_CONFIG", "QUOTAD_SOCKET"] {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            // SAFETY: no other thread exists yet.
            unsafe { std::env::remove_var(var) };
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    quotad::tls::install_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, socket } => serve(config, socket).map(|()| ExitCode::SUCCESS),
        Command::Check {
            tenant,
            key,
            policy,
            cost,
            at,
        } => one_shot(check(tenant, key, policy, cost, at)),
        Command::Tenant { command, at } => one_shot(tenant(command, at)),
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

fn serve(path: Option<PathBuf>, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = load(path.as_ref())?;
    if let Some(socket) = socket {
        config.server.socket = socket;
    }
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
        Some(r) => r.addresses(),
    };
    let daemon = Daemon::start(config, Clock::System)?;
    daemon.warm_up().await?;
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    quotad::shutdown::listen(shutdown.clone(), reload_tx).context("installing signal handlers")?;
    tracing::info!(socket = %daemon.socket().display(), backend, version = env!("CARGO_PKG_VERSION"), "quotad ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    daemon.run(shutdown, reload_rx, path).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    Ok(())
}

/// Runs one client command on a small runtime of its own.
fn one_shot(f: impl Future<Output = anyhow::Result<ExitCode>>) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

async fn connect(at: Socket) -> anyhow::Result<Client> {
    let socket = match at.socket {
        Some(s) => s,
        None => load(at.config.as_ref())?.server.socket,
    };
    Client::connect(&socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

async fn check(
    tenant: String,
    key: String,
    policy: Option<String>,
    cost: u64,
    at: Socket,
) -> anyhow::Result<ExitCode> {
    let client = connect(at).await?;
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

async fn tenant(command: TenantCommand, at: Socket) -> anyhow::Result<ExitCode> {
    let client = connect(at).await?;
    let show = |tenant: &str, plan: &str, limits: &std::collections::BTreeMap<String, f64>| {
        let limits: Vec<String> = limits.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        println!("{tenant} plan={plan}{}", limits.concat());
    };
    match command {
        TenantCommand::Get { tenant } => match client.tenant_get(&tenant).await? {
            Some(r) => show(&tenant, &r.plan, &r.limits),
            None => println!("{tenant} unknown to the source: plan=default"),
        },
        TenantCommand::Set {
            tenant,
            plan,
            limits,
        } => {
            let record = TenantRecord {
                plan,
                limits: limits.into_iter().collect(),
            };
            client.tenant_set(&tenant, record).await?;
        }
        TenantCommand::Delete { tenant } => {
            if !client.tenant_delete(&tenant).await? {
                println!("{tenant} had no record");
            }
        }
        TenantCommand::List => {
            for t in client.tenant_list().await? {
                show(&t.tenant, &t.plan, &t.limits);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
