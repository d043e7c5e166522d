//! Network cuts: an `iptables` rule between some processes and a port, and the scenario every
//! partition test runs (count, cut, 503 within the timeout, heal, count on).

use std::time::Duration;

use serde_json::json;

use super::client::{browser, seen};
use super::redis::skipped;
use super::sidecar::Sidecar;

/// An `iptables` rule that drops what processes of `uid` send to 127.0.0.1:`port`, removed on
/// drop: the sentinels lose the master while the sidecar still reaches it.
pub struct Cut {
    rule: Vec<String>,
}

impl Cut {
    /// `None` (saying why) where the firewall cannot be changed.
    pub fn new(uid: u32, port: u16) -> Option<Cut> {
        let rule: Vec<String> = [
            "OUTPUT",
            "-o",
            "lo",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-m",
            "owner",
            "--uid-owner",
            &uid.to_string(),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let added = std::process::Command::new("iptables")
            .arg("-I")
            .args(&rule)
            .status();
        match added {
            Ok(s) if s.success() => Some(Cut { rule }),
            other => {
                skipped(&format!(
                    "iptables cannot add a rule ({other:?}); it needs root and the iptables package"
                ));
                None
            }
        }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .arg("-D")
            .args(&self.rule)
            .status();
    }
}

/// A visitor counts through `sidecar`; `cut` partitions it from (part of) Redis: every request
/// answers 503 within the command timeout (2 s), and once the cut is dropped the visitor goes
/// on counting from where it was. Skips (returns) when `cut` cannot be made.
pub async fn partition_and_heal(sidecar: &Sidecar, cut: impl FnOnce() -> Option<Vec<Cut>>) {
    let client = browser();
    let count = async || sidecar.get(&client, "/").incr("n").send().await;
    for expected in 0..3 {
        let resp = count().await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            seen(resp)
                .await
                .session()
                .get("n")
                .cloned()
                .unwrap_or(json!(0)),
            expected
        );
    }
    let Some(cut) = cut() else {
        return;
    };
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let resp = count().await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert_eq!(
            resp.status(),
            503,
            "cut off: {}",
            resp.text().await.unwrap()
        );
        assert!(
            took < Duration::from_millis(2900),
            "503 after {took:?}; command_timeout is 2 s"
        );
    }
    drop(cut);
    let healed = std::time::Instant::now();
    loop {
        let resp = count().await;
        if resp.status() == 200 {
            let n = seen(resp).await.session()["n"].as_i64().unwrap();
            // The refused requests' changes were never made (the writes did not reach Redis).
            assert_eq!(n, 3, "the session as it was before the cut");
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "no recovery within 30 s of the heal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "partition: 503 within {slowest:?} (slowest of 3); served again {:?} after the heal",
        healed.elapsed()
    );
}
