//! The `quotad` command: `serve` runs the daemon, `check` asks it once
//! (`usage` reports every rule without charging),
//! `tenant` manages tenants' plans through it, `stats` and `health` look
//! inside it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quotad::client::{Client, ClientError};
use quotad::clock::Clock;
use quotad::config::TenantRecord;
use quotad::config::{Config, LogFormat};
use quotad::daemon::Daemon;
use quotad::limiter::Lease;
use tokio_util::sync::CancellationToken;

/// See Cargo.toml: a request's strings are allocated and freed in bulk.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "quotad",
    version,
    about = "Rate-limiting and caching sidecar: MessagePack over a Unix socket, decided in Redis",
    long_about = "Rate-limiting and caching sidecar. Applications ask it, over a local Unix \
socket, whether a caller may go ahead and whether a response is already cached; it \
answers atomically from Redis (or from memory), so every process shares the same limits \
and the same cache. `quotad serve` runs it; `check` and `tenant` talk to a running one."
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
        /// The log's format, instead of the config's `log.format` (default human).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Ask a running quotad for one decision. Exit status: 0 allowed, 1 denied,
    /// 2 error, 3 degraded (decided by the failure mode, not by Redis).
    Check {
        #[command(flatten)]
        what: Target,
        /// Units to charge; 0 peeks without charging.
        #[arg(long, default_value_t = 1)]
        cost: u64,
        /// Exit by the decision (0 or 1) even when it is degraded, instead of 3.
        #[arg(long)]
        allow_degraded: bool,
        #[command(flatten)]
        at: Socket,
    },
    /// Give back a lease that `check` printed (`lease=`, under a policy with
    /// a concurrency rule). Exit status: 0 released, 1 it was not held
    /// (released already, expired, unknown), 2 error.
    Release {
        /// The check's tenant, key and policy.
        #[command(flatten)]
        what: Target,
        /// The lease, as `check` printed it.
        #[arg(long)]
        lease: String,
        #[command(flatten)]
        at: Socket,
    },
    /// Print every rule of a policy as it stands for one key, one line per
    /// rule, charging nothing. Exit status: 0, or 2 on error.
    Usage {
        #[command(flatten)]
        what: Target,
        #[command(flatten)]
        at: Socket,
    },
    /// Print a running quotad's counters (see docs/protocol.md, `stats`).
    Stats {
        /// Print them as one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Socket,
    },
    /// Is a running quotad healthy? Exit status: 0 it answers and Redis is
    /// up (or not used), 1 it answers but Redis is down (its circuit breaker
    /// is open: decisions follow each policy's failure mode), 2 it cannot be
    /// reached. A slow Redis, or one that fails now and then with the
    /// breaker still closed, gives 0: see docs/operations.md.
    Health {
        /// Liveness only: exit 0 whenever quotad answers, Redis up or not.
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        at: Socket,
    },
    /// Tenants' plans, through the running daemon (admin ops: for the users
    /// in `admin.allowed_uids`, or those an `[[access]]` rule grants
    /// `admin = true`). `set` and `delete` need the `redis` source.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
        #[command(flatten)]
        at: Socket,
    },
}

/// What a `check`, `release` or `usage` is about.
#[derive(clap::Args)]
struct Target {
    /// The tenant the caller belongs to (its plan sets the limits).
    #[arg(long)]
    tenant: String,
    /// Who is limited within the tenant (a user, an API key, an IP).
    #[arg(long)]
    key: String,
    /// The policy (default: the one named `default`).
    #[arg(long)]
    policy: Option<String>,
}

/// Where the running daemon is.
#[derive(clap::Args)]
struct Socket {
    /// The daemon's socket (default: the config's, else the default path).
    #[arg(long, env = "QUOTAD_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// The daemon's config file: gives the socket (unless --socket) and,
    /// after an unknown policy, the policies there are.
    #[arg(long, env = "QUOTAD_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Show a tenant's plan and own limits, as the source has them.
    Get {
        /// The tenant.
        tenant: String,
    },
    /// Put a tenant on a plan, with limits of its own
    /// (`--limit api.burst.capacity=5000`, repeatable). Takes effect at once.
    Set {
        /// The tenant.
        tenant: String,
        /// One of the config's `[plans.<name>]`.
        #[arg(long)]
        plan: String,
        /// A limit of the tenant's own, `<policy>.<rule>.<parameter>=<number>`
        /// (repeatable); overrides the plan's.
        #[arg(long = "limit", value_name = "POLICY.RULE.PARAMETER=NUMBER", value_parser = parse_limit)]
        limits: Vec<(String, f64)>,
    },
    /// Remove a tenant's record: it falls back to the default plan.
    Delete {
        /// The tenant.
        tenant: String,
    },
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
    quotad::tls::install_provider();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        init_log(LogFormat::Human);
    }
    let result = match cli.command {
        Command::Serve {
            config,
            socket,
            log_format,
        } => serve(config, socket, log_format).map(|()| ExitCode::SUCCESS),
        Command::Check {
            what,
            cost,
            allow_degraded,
            at,
        } => one_shot(check(what, cost, allow_degraded, at)),
        Command::Release { what, lease, at } => one_shot(release(what, lease, at)),
        Command::Usage { what, at } => one_shot(usage(what, at)),
        Command::Tenant { command, at } => one_shot(tenant(command, at)),
        Command::Stats { json, at } => one_shot(stats(json, at)),
        Command::Health { live, at } => one_shot(health(live, at)),
    };
    result.unwrap_or_else(|e| {
        eprintln!("quotad: {}", render(&e));
        ExitCode::from(2)
    })
}

/// The error and its causes, `: `-separated, leaving out a cause that its
/// parent's message already ends with (an I/O error wrapped with its text).
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::builtin(),
    })
}

/// The log on stderr, at `RUST_LOG`'s level (default `info`).
fn init_log(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => log
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => log.json().with_current_span(false).init(),
    }
}

fn serve(
    path: Option<PathBuf>,
    socket: Option<PathBuf>,
    log_format: Option<LogFormat>,
) -> anyhow::Result<()> {
    // SAFETY: no other thread exists yet (the runtime starts below).
    let inherited = unsafe { quotad::systemd::take_listener() }.context("socket activation")?;
    // The config says how to log, so a config error is only printed.
    let mut config = load(path.as_ref())?;
    init_log(log_format.unwrap_or(config.log.format));
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
    runtime.block_on(run(config, path, inherited))
}

async fn run(
    config: Config,
    path: Option<PathBuf>,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<()> {
    let backend = match &config.redis {
        None => "memory".to_owned(),
        Some(r) => r.addresses(),
    };
    let activated = inherited.is_some();
    let daemon = Daemon::start(config, Clock::System, inherited)?;
    daemon.warm_up().await?;
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    quotad::shutdown::listen(shutdown.clone(), reload_tx).context("installing signal handlers")?;
    tracing::info!(socket = %daemon.socket().display(), activated, backend, version = env!("CARGO_PKG_VERSION"), "quotad ready");
    quotad::systemd::ready();
    quotad::systemd::spawn_watchdog();
    daemon.run(shutdown, reload_rx, path).await;
    Ok(())
}

/// Runs one client command on a small runtime of its own.
fn one_shot(f: impl Future<Output = anyhow::Result<ExitCode>>) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// `--socket`, else the config's socket.
fn socket_path(at: &Socket) -> anyhow::Result<PathBuf> {
    Ok(match &at.socket {
        Some(s) => s.clone(),
        None => load(at.config.as_ref())?.server.socket,
    })
}

async fn connect(at: &Socket) -> anyhow::Result<Client> {
    let socket = socket_path(at)?;
    Client::connect(&socket).await.map_err(|e| {
        anyhow::anyhow!(
            "{e}\nIs quotad running? Start it with `quotad serve`, or give its socket \
             with --socket or QUOTAD_SOCKET."
        )
    })
}

async fn check(
    what: Target,
    cost: u64,
    allow_degraded: bool,
    at: Socket,
) -> anyhow::Result<ExitCode> {
    let client = connect(&at).await?;
    let d = client
        .check(&what.tenant, &what.key, what.policy.as_deref(), cost)
        .await
        .map_err(|e| explained(e, &at))?;
    // A lease (policies with concurrency rules) goes last, so scripts that
    // read the other fields by position keep working.
    let lease = d.lease.map(|l| format!(" lease={l}")).unwrap_or_default();
    println!(
        "allowed={} limit={} remaining={} reset_ms={} retry_after_ms={} rule={} degraded={}{lease}",
        d.allowed, d.limit, d.remaining, d.reset_ms, d.retry_after_ms, d.rule, d.degraded
    );
    if let Some(shadow) = &d.shadow_rule {
        println!("shadow_denied=true shadow_rule={shadow}");
    }
    Ok(if d.degraded && !allow_degraded {
        eprintln!(
            "quotad: degraded: decided by the policy's failure mode, not by the backend \
             (see quotad's log); exit status 3 (--allow-degraded: exit by the decision)"
        );
        ExitCode::from(3)
    } else if d.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn release(what: Target, lease: String, at: Socket) -> anyhow::Result<ExitCode> {
    let Some(lease) = Lease::parse(&lease) else {
        anyhow::bail!(
            "`{lease}` is not a lease: give the 32 hex digits `quotad check` printed after lease="
        );
    };
    let client = connect(&at).await?;
    let released = client
        .release(&what.tenant, &what.key, what.policy.as_deref(), lease)
        .await?;
    println!("released={released}");
    Ok(if released {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn usage(what: Target, at: Socket) -> anyhow::Result<ExitCode> {
    let client = connect(&at).await?;
    let rules = client
        .usage(&what.tenant, &what.key, what.policy.as_deref())
        .await
        .map_err(|e| explained(e, &at))?;
    for u in rules {
        println!(
            "rule={} kind={} limit={} used={} remaining={} reset_ms={} window_ms={}",
            u.rule, u.kind, u.limit, u.used, u.remaining, u.reset_ms, u.window_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A request's error; an unknown policy's with the policies there are.
fn explained(e: ClientError, at: &Socket) -> anyhow::Error {
    match &e {
        ClientError::Server { code, .. } if code == "unknown_policy" => {
            anyhow::anyhow!("{e}; {}", known_policies(at))
        }
        _ => e.into(),
    }
}

/// After an unknown policy: the policies the config file defines, or how
/// to list them (the daemon's reply does not).
fn known_policies(at: &Socket) -> String {
    let Some(path) = &at.config else {
        return "pass one of the daemon's policies with --policy (--config <its file> lists them)"
            .to_owned();
    };
    // The file was read and validated already (it gave the socket, unless
    // --socket did): its `[policies]` table's keys are the names.
    let table: Option<toml::Table> = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse().ok());
    let names: Vec<String> = table
        .as_ref()
        .and_then(|t| t.get("policies")?.as_table())
        .map(|p| p.keys().map(|n| format!("`{n}`")).collect())
        .unwrap_or_default();
    if names.is_empty() {
        return format!("{} defines no policies", path.display());
    }
    format!(
        "{} defines {}: pass one with --policy",
        path.display(),
        names.join(", ")
    )
}

async fn stats(json: bool, at: Socket) -> anyhow::Result<ExitCode> {
    let reply = connect(&at).await?.stats().await?;
    let counters = reply.counters.unwrap_or_default();
    let shadow = reply.shadow_denials.unwrap_or_default();
    if json {
        /// Fields in this order whatever serde_json's features.
        #[derive(serde::Serialize)]
        struct Out<'a> {
            uptime_ms: Option<u64>,
            backend: Option<&'a str>,
            shards: Option<u64>,
            counters: &'a std::collections::BTreeMap<String, u64>,
            shadow_denials: &'a std::collections::BTreeMap<String, u64>,
        }
        let out = Out {
            uptime_ms: reply.uptime_ms,
            backend: reply.backend.as_deref(),
            shards: reply.shards,
            counters: &counters,
            shadow_denials: &shadow,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "uptime_ms={} backend={} shards={}",
            reply.uptime_ms.unwrap_or_default(),
            reply.backend.as_deref().unwrap_or("?"),
            reply.shards.unwrap_or_default()
        );
        // Shadow denials by rule, as `shadow_denied.<policy>.<rule>`.
        let shadow: Vec<(String, u64)> = (shadow.into_iter())
            .map(|(rule, n)| (format!("shadow_denied.{rule}"), n))
            .collect();
        let all = counters.iter().map(|(k, v)| (k.as_str(), *v));
        let all: Vec<(&str, u64)> = all
            .chain(shadow.iter().map(|(k, v)| (k.as_str(), *v)))
            .collect();
        let width = all.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (name, value) in all {
            println!("{name:<width$}  {value:>12}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn health(live: bool, at: Socket) -> anyhow::Result<ExitCode> {
    socket_path(&at)?; // a bad config is an error of its own (exit 2 too)
    let stats = match connect(&at).await {
        Ok(client) => client.stats().await.map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    let (backend, counters) = match stats {
        Ok(reply) => (reply.backend, reply.counters.unwrap_or_default()),
        Err(e) => {
            println!("unreachable: {}", render(&e));
            return Ok(ExitCode::from(2));
        }
    };
    if counters.get("breaker_open").is_some_and(|&open| open != 0) {
        println!(
            "degraded: quotad answers, but Redis does not (circuit breaker open): \
             decisions follow each policy's failure mode"
        );
        return Ok(ExitCode::from(u8::from(!live)));
    }
    match backend.as_deref() {
        Some("redis") => println!("ok: quotad answers and Redis is up"),
        _ => println!("ok: quotad answers (in-memory backend)"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn tenant(command: TenantCommand, at: Socket) -> anyhow::Result<ExitCode> {
    let client = connect(&at).await?;
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
            client.tenant_set(&tenant, record.clone()).await?;
            print!("set: ");
            show(&tenant, &record.plan, &record.limits);
        }
        TenantCommand::Delete { tenant } => {
            if client.tenant_delete(&tenant).await? {
                println!("deleted: {tenant} is on the default plan");
            } else {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `--help` explains every flag and argument of every subcommand.
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" {
                    assert!(arg.get_help().is_some(), "{path} {id} has no help text");
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        super::Cli::command().debug_assert();
        walk(&super::Cli::command(), "quotad");
    }
}
