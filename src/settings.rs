//! What one load of the configuration produces — at start and at every reload alike: the
//! validated config, the expiry policy, the cookie signer, the record codec, the creation limit,
//! and the [`Sessions`] the request pipeline talks to (the pipeline's only door to session
//! state).

use std::sync::Arc;

use crate::config::Config;
use crate::cookie::SessionCookie;
use crate::limits::CreationLimit;
use crate::session::{Codec, Policy, Sessions, Storage};

/// What one configuration gives every worker, derived once per load.
pub struct Settings {
    pub config: Arc<Config>,
    pub policy: Arc<Policy>,
    pub cookie: Arc<SessionCookie>,
    /// `[limits] new_sessions_per_minute`, shared by every worker.
    pub creation_limit: Option<Arc<CreationLimit>>,
    pub sessions: Arc<Sessions>,
}

impl Settings {
    /// `previous`, when given, lends what has not changed and carries state: the creation
    /// limit's counts survive a reload that keeps its rate.
    pub fn new(config: Config, previous: Option<&Settings>, storage: &Storage) -> Settings {
        let policy = Arc::new(policy(&config));
        let sessions = Sessions::new(storage, policy.clone(), config.max_session_bytes)
            .with_subject_limit(config.max_sessions_per_subject);
        Settings {
            creation_limit: creation_limit(
                &config,
                previous.map(|p| (&*p.config, &p.creation_limit)),
            ),
            cookie: Arc::new(SessionCookie::new(
                config.cookie.clone(),
                config.secret_key.as_deref(),
                &config.secret_key_fallbacks,
            )),
            sessions: Arc::new(sessions),
            policy,
            config: Arc::new(config),
        }
    }

    /// How the store writes and reads records under these settings.
    pub fn codec(&self) -> Codec {
        codec(&self.config)
    }
}

/// The creation limit `config` asks for: the previous one, counts and all, when its rate is
/// unchanged.
fn creation_limit(
    config: &Config,
    previous: Option<(&Config, &Option<Arc<CreationLimit>>)>,
) -> Option<Arc<CreationLimit>> {
    match previous {
        Some((old, kept)) if old.new_sessions_per_minute == config.new_sessions_per_minute => {
            kept.clone()
        }
        _ => config
            .new_sessions_per_minute
            .map(|n| Arc::new(CreationLimit::new(n))),
    }
}

/// The expiry policy the config describes.
pub fn policy(config: &Config) -> Policy {
    config.expiry.policy(config.upstream_timeout)
}

/// How the store writes and reads records under `config`: sealed with keys derived from the
/// secret and its fallbacks when `store.encrypt` is on, plain JSON otherwise; subjects digested
/// with the secret when one is set.
pub fn codec(config: &Config) -> Codec {
    let fallbacks = &config.secret_key_fallbacks;
    match (&config.secret_key, config.store.encrypt) {
        (Some(secret), true) => Codec::sealed(secret, fallbacks),
        (secret, _) => Codec::unsealed(secret.as_deref(), fallbacks),
    }
    .with_legacy_names(config.store.legacy_names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    #[test]
    fn a_reload_keeps_the_creation_limit_and_its_counts_unless_the_rate_changes() {
        let five = config("[limits]\nnew_sessions_per_minute = 5");
        let old = creation_limit(&five, None);
        let same = creation_limit(&five, Some((&five, &old)));
        assert!(Arc::ptr_eq(old.as_ref().unwrap(), same.as_ref().unwrap()));
        let nine = config("[limits]\nnew_sessions_per_minute = 9");
        let faster = creation_limit(&nine, Some((&five, &old)));
        assert!(!Arc::ptr_eq(
            old.as_ref().unwrap(),
            faster.as_ref().unwrap()
        ));
        assert!(creation_limit(&config(""), Some((&five, &old))).is_none());
    }
}
