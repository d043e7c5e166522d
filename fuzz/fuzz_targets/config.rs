#![no_main]
//! Arbitrary configuration text and environment overrides: errors, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (file, env) = text.split_once('\0').unwrap_or((text, ""));
    let vars = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("SESSION_SIDECAR_{k}"), v.to_string()));
    let _ = session_sidecar::Config::from_toml_with_env(file, vars);
    let _ = session_sidecar::config::effective_toml(file, std::iter::empty());
});
