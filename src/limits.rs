//! `[limits] new_sessions_per_minute`: how many sessions one client address may create per
//! minute, as a GCRA rate limiter (the `governor` crate) keyed by address and shared by every
//! worker. Bots that create a session per request would otherwise fill the store.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Admissions between two sweeps of addresses that have not created a session lately.
const SWEEP_EVERY: u64 = 1024;

pub struct CreationLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl CreationLimit {
    /// `per_minute` sessions, all at once or spread out, then one more every `60 / per_minute`
    /// seconds.
    pub fn new(per_minute: NonZeroU32) -> CreationLimit {
        CreationLimit {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            checks: AtomicU64::new(0),
        }
    }

    /// `Ok` when `addr` may create a session now (and counts it), else the whole seconds until
    /// it may (at least 1), for `Retry-After`.
    pub fn admit(&self, addr: IpAddr) -> Result<(), u64> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&addr).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            wait.as_secs_f64().ceil().max(1.0) as u64
        })
    }
}

/// The client's address: the peer's, or behind a trusted proxy the one it appended last to
/// `X-Forwarded-For` (earlier entries are the client's own claims).
pub fn client_addr(headers: &http::HeaderMap, peer: IpAddr, trust_forwarded: bool) -> IpAddr {
    if !trust_forwarded {
        return peer;
    }
    headers
        .get_all(&crate::headers::X_FORWARDED_FOR)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_allowance_and_is_told_how_long_to_wait() {
        let limit = CreationLimit::new(NonZeroU32::new(3).unwrap());
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(limit.admit(a), Ok(()));
        }
        let wait = limit.admit(a).unwrap_err();
        assert!((1..=20).contains(&wait), "one more every 20 s: {wait}");
        assert_eq!(limit.admit(b), Ok(()), "another address");
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_says_otherwise() {
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
        assert_eq!(client_addr(&h, peer, false), peer);
        assert_eq!(
            client_addr(&h, peer, true),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        h.insert("x-forwarded-for", "not an address".parse().unwrap());
        assert_eq!(client_addr(&h, peer, true), peer);
        assert_eq!(client_addr(&http::HeaderMap::new(), peer, true), peer);
    }
}
