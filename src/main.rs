//! The `session-sidecar` command: run the proxy, check a config, or clear expired sessions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use session_sidecar::{Config, Deps};

/// mimalloc: the request path allocates many short-lived small buffers (headers, JSON, sled
/// nodes); measured with bench/run.py it beats glibc's malloc here (see README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "session-sidecar",
    version,
    about = "Django-style sessions for a legacy web app, as a reverse proxy"
)]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, global = true, default_value = "config/sidecar.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, print the effective values (secrets masked), exit 0 or 1.
    CheckConfig,
    /// Remove expired sessions once and print how many (Django's clearsessions).
    ClearExpired,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Some(Command::CheckConfig) => check_config(&cli.config),
        Some(Command::ClearExpired) => clear_expired(&cli.config),
        None => serve(&cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    runtime()?.block_on(async move {
        let deps = Deps::open(&config).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("config key `listen`: cannot bind {}", config.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            upstream = %config.upstream,
            store = %config.store.path.display(),
            "session-sidecar serving"
        );
        let admin = session_sidecar::bind_admin(&config).await?;
        session_sidecar::run_with_admin(
            config,
            listener,
            admin,
            session_sidecar::shutdown_signal(),
            deps,
        )
        .await?;
        Ok(())
    })
}

fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let effective = session_sidecar::config::effective_toml(&text, std::env::vars())?;
    println!("# {} is valid; effective configuration:", path.display());
    print!("{effective}");
    Ok(())
}

fn clear_expired(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    runtime()?.block_on(async move {
        let deps = Deps::open(&config).await?;
        let swept = deps.store.sweep(deps.clock.now()).await?;
        deps.store.sync().await?;
        println!("removed {} expired session(s)", swept.sessions);
        Ok(())
    })
}
