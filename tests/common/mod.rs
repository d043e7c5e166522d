//! Real parts for the integration tests, each file named after what it fakes or starts:
//!
//! - `apps`: upstream apps (the echo app and its `Seen` report, a gated echo, raw bytes, a Unix
//!   socket app, the Python example) and child processes;
//! - `sidecar`: the sidecar in-process in front of an app, on a temporary store, with a clock
//!   the test moves;
//! - `client`: cookie-keeping and plain clients, `get`/`Visit` for one request as a test states
//!   it, what came back, raw bytes on a connection;
//! - `redis`, `sentinel`, `cluster`: real Redis servers, a Sentinel set, a cluster;
//! - `cuts`: `iptables` cuts between a process and a port, and the partition scenario;
//! - `faulty`: a store that fails on demand;
//! - `binary`, `relay`: the real binary as operators start it, a relay that delays bytes;
//! - `chromium`: a real headless browser, driven through its DevTools protocol.
//!
//! Every test binary compiles all of this and uses some of it, hence the allowances below.
#![allow(dead_code)]

mod apps;
pub mod binary;
pub mod chromium;
mod client;
mod cluster;
mod cuts;
mod faulty;
mod redis;
pub mod relay;
mod sentinel;
mod sidecar;

#[allow(unused_imports)]
pub use self::{
    apps::*, client::*, cluster::*, cuts::*, faulty::*, redis::*, sentinel::*, sidecar::*,
};
