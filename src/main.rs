//! The `session-sidecar` command: run the proxy, check a config, or clear expired sessions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use session_sidecar::{Config, Deps};

/// mimalloc: the request path allocates many short-lived small buffers (headers, JSON, sled
/// nodes); measured with bench/run.py it beats glibc's malloc here (docs/PERFORMANCE.md).
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
    /// Ask the running sidecar's admin listener whether it is ready (`/readyz`): exit 0 if so,
    /// 1 otherwise. For container health checks; needs no curl.
    Healthcheck,
    /// Look at or end one session, through the running sidecar's admin listener.
    Sessions {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// List or revoke a subject's sessions ("log out everywhere"), through the admin listener.
    Subjects {
        #[command(subcommand)]
        action: SubjectAction,
    },
}

#[derive(Subcommand)]
enum SessionAction {
    /// Print the session's data and metadata as JSON.
    Show { key: String },
    /// End the session (as a logout).
    Delete { key: String },
}

#[derive(Subcommand)]
enum SubjectAction {
    /// Print the handles and metadata of the subject's live sessions (never their keys).
    List { subject: String },
    /// End all of them.
    Revoke { subject: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_filter = init_logs(&cli.config);
    let result = match cli.command {
        Some(Command::CheckConfig) => check_config(&cli.config),
        Some(Command::ClearExpired) => clear_expired(&cli.config),
        Some(Command::Healthcheck) => admin_call(&cli.config, "GET", "/readyz"),
        Some(Command::Sessions { action }) => match action {
            SessionAction::Show { key } => {
                admin_call(&cli.config, "GET", &format!("/sessions/{}", segment(&key)))
            }
            SessionAction::Delete { key } => admin_call(
                &cli.config,
                "DELETE",
                &format!("/sessions/{}", segment(&key)),
            ),
        },
        Some(Command::Subjects { action }) => match action {
            SubjectAction::List { subject } => admin_call(
                &cli.config,
                "GET",
                &format!("/subjects/{}", segment(&subject)),
            ),
            SubjectAction::Revoke { subject } => admin_call(
                &cli.config,
                "DELETE",
                &format!("/subjects/{}", segment(&subject)),
            ),
        },
        None => serve(&cli.config, log_filter),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `text` as one path segment: everything but unreserved characters percent-encoded, so a
/// subject such as `a?x` or `a/b` reaches the admin listener whole.
fn segment(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

/// Logs to stderr in the config's format, filtered by `RUST_LOG` when it is set, else by the
/// config's `log_level`. Returns how a reload sets the filter (`None` while `RUST_LOG` rules).
/// Errors reading the config are reported by the command itself.
fn init_logs(path: &std::path::Path) -> Option<session_sidecar::LogFilter> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, reload};

    let config = Config::load(path).ok();
    let json = config.as_ref().is_some_and(|c| c.log_json);
    let from_env = EnvFilter::try_from_default_env().ok();
    let ruled_by_env = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| {
        let level = config
            .as_ref()
            .map_or(session_sidecar::config::DEFAULT_LOG_LEVEL, |c| {
                c.log_level.as_str()
            });
        EnvFilter::builder().parse_lossy(level)
    });
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi && !json);
    let logs = tracing_subscriber::registry().with(filter);
    if json {
        logs.with(format.json()).init();
    } else {
        logs.with(format).init();
    }
    (!ruled_by_env).then(|| {
        Box::new(move |level: &str| {
            let filter = EnvFilter::builder()
                .parse(level)
                .map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }) as session_sidecar::LogFilter
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(
    path: &std::path::Path,
    log_filter: Option<session_sidecar::LogFilter>,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    runtime()?.block_on(async move {
        // Before anything says it serves: an early SIGHUP must not end the process (its default).
        let reloads = session_sidecar::Reloads::on_hangup(path.to_path_buf(), log_filter)
            .context("listening for SIGHUP")?;
        let deps = Deps::open(&config).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("config key `listen`: cannot bind {}", config.listen))?;
        // Bound before the sidecar says it serves: a taken admin port ends it first.
        let admin = session_sidecar::bind_admin(&config).await?;
        tracing::info!(
            listen = %listener.local_addr()?,
            upstream = %config.upstream,
            store = %config.store.path.display(),
            "session-sidecar serving"
        );
        session_sidecar::run_with_admin(
            config,
            listener,
            admin,
            session_sidecar::shutdown_signal(),
            deps,
            Some(reloads),
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

/// One request to the running sidecar's admin listener, with the token from the same config.
fn admin_call(path: &std::path::Path, method: &str, endpoint: &str) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let config = Config::load(path)?;
    let mut addr = config
        .admin
        .listen
        .context("the admin listener is off in this config (admin.listen = \"\")")?;
    // A listener on every address (a container's 0.0.0.0) is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    runtime()?.block_on(async move {
        let client: Client<_, Full<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{endpoint}"));
        if let Some(token) = &config.admin.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.request(req.body(Full::default())?),
        )
        .await
        .with_context(|| format!("the admin listener at {addr} did not answer within 10 s"))?
        .with_context(|| {
            format!("cannot reach the admin listener at {addr}: is the sidecar running?")
        })?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        match status.as_u16() {
            200 => println!("{}", text.trim_end()),
            204 => println!("done"),
            401 => anyhow::bail!("the admin listener refused the token (admin.token)"),
            404 => anyhow::bail!("not found: {}", text.trim_end()),
            other => anyhow::bail!("admin listener answered {other}: {}", text.trim_end()),
        }
        Ok(())
    })
}
