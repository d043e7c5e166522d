//! Start-up wiring: one configuration's workers, the admin listener, the sweeper, live reload,
//! and the shutdown. `reload` and `server` are private to this module, so that nothing else (the
//! request pipeline above all) can reach the SIGHUP machinery or the accept loops.

mod reload;
mod server;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use reload::{LogFilter, Reloads};

use crate::session::{self, StoreError};
use crate::{Config, Deps, admin, drain, metrics, proxy, settings};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("shutdown grace period ran out with {0} request(s) still in flight; they were cut")]
    GraceExceeded(usize),
    #[error("flushing the session store on shutdown failed")]
    Flush(#[source] StoreError),
    #[error("starting the worker threads: {0}")]
    Workers(std::io::Error),
    // The reason is in the message, not a `source`: a chain would print it twice.
    #[error("config key `admin.listen`: cannot bind {addr}: {reason}")]
    AdminBind {
        addr: std::net::SocketAddr,
        reason: std::io::Error,
    },
}

/// Binds the admin listener the config asks for (none when `admin.listen = ""`).
pub async fn bind_admin(config: &Config) -> Result<Option<TcpListener>, RunError> {
    match config.admin.listen {
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|reason| RunError::AdminBind { addr, reason }),
        None => Ok(None),
    }
}

/// Serves `listener` (and the admin listener the config asks for) until `shutdown` resolves,
/// then drains and flushes the store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    deps: Deps,
) -> Result<(), RunError> {
    let admin = bind_admin(&config).await?;
    run_with_admin(config, listener, admin, shutdown, deps, None).await
}

/// As [`run`], with the admin listener already bound (or none), and reloads when asked.
pub async fn run_with_admin(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
    deps: Deps,
    reloads: Option<reload::Reloads>,
) -> Result<(), RunError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let store = deps.store.watched(metrics.clone());
    let settings = Arc::new(settings::Settings::new(config, None, &store));
    let config = settings.config.clone();
    let (settings_tx, settings_rx) = tokio::sync::watch::channel(settings.clone());
    let (sweep_tx, sweep_rx) = tokio::sync::watch::channel(config.expiry.sweep_interval);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tracker = drain::Tracker::new(draining.clone());
    let sweeper = tokio::spawn(session::sweep_every(
        store.clone(),
        deps.clock.clone(),
        sweep_rx,
        stop_rx.clone(),
    ));
    let admin_task = admin.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(admin = %addr, "admin listener serving");
        }
        let admin = Arc::new(admin::Admin {
            store: store.clone(),
            clock: deps.clock.clone(),
            metrics: metrics.clone(),
            settings: settings_rx,
            draining,
        });
        tokio::spawn(admin::serve(listener, admin, stop_rx))
    });
    // Every worker accepts from the same listening socket and has its own upstream connections.
    let listener = listener.into_std().map_err(RunError::Workers)?;
    let mut workers = Vec::with_capacity(config.workers);
    for _ in 1..config.workers {
        workers.push(listener.try_clone().map_err(RunError::Workers)?);
    }
    workers.push(listener);
    let shared = proxy::Shared {
        clock: deps.clock.clone(),
        metrics: metrics.clone(),
        tracker: tracker.clone(),
    };
    let workers: Vec<_> = workers
        .into_iter()
        .map(|listener| {
            let worker = Arc::new(proxy::Worker::new(&settings, shared.clone()));
            (listener, worker)
        })
        .collect();
    let reloader = reloads.map(|reloads| {
        let reloader = reload::Reloader {
            settings: settings_tx,
            sweep_interval: sweep_tx,
            workers: workers.iter().map(|(_, w)| w.clone()).collect(),
            store: store.clone(),
        };
        tokio::spawn(reloader.serve(reloads))
    });
    let served = server::serve(workers, shutdown, &config, metrics, tracker).await;
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    store.sync().await.map_err(RunError::Flush)?;
    let cut = served.map_err(RunError::Workers)?;
    if cut > 0 {
        tracing::error!(cut, "shutdown grace ran out; requests were cut");
        return Err(RunError::GraceExceeded(cut));
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
