//! The sidecar in-process (`common::sidecar`) in front of a test app, driven over real HTTP: one
//! file per behaviour area, one test binary for all of them. Run an area on its own with
//! `cargo test --test http sessions::`.
//!
//! One binary rather than thirteen because each test binary compiles `common` and links the
//! whole dependency tree again: merged, the package builds in about a third less time. Tests
//! that read their own process (`tests/streaming.rs` measures its peak memory) or whose names
//! the docs and scripts use (`--test redis`, `bytes`, `model`, ...) keep a binary of their own.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod bad_input;
mod concurrency;
mod cookies;
mod csrf;
mod drain;
mod expiry;
mod limits;
mod proxy;
mod retired;
mod sessions;
mod trust;
mod unix_upstream;
