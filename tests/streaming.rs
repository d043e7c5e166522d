//! Bodies are streamed, never held whole (docs/HEADERS.md §6). Alone in its own test binary so that the
//! process's peak memory measures this test only.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_core::Stream;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

async fn next_chunk(s: &mut (impl Stream<Item = reqwest::Result<Bytes>> + Unpin)) -> Option<Bytes> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_next(cx))
        .await
        .map(|c| c.unwrap())
}

#[tokio::test]
async fn the_first_bytes_reach_the_client_before_the_upstream_has_finished() {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let r2 = release.clone();
    let app = start_app(move |_req: Request<Incoming>| {
        let release = r2.clone();
        async move {
            let (tx, rx) =
                tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
                    .await
                    .unwrap();
                release.notified().await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"last"))))
                    .await
                    .unwrap();
            });
            let body = http_body_util::StreamBody::new(ReceiverStream(rx));
            Response::new(http_body_util::BodyExt::boxed(body))
        }
    })
    .await;
    let s = sidecar_for(app, "").await;
    let resp = s.get(&plain(), "/").send().await;
    let mut stream = Box::pin(resp.bytes_stream());
    let first = tokio::time::timeout(Duration::from_secs(5), next_chunk(&mut stream))
        .await
        .expect("streamed");
    assert_eq!(first.unwrap(), Bytes::from_static(b"first"));
    release.notify_one();
    assert_eq!(
        next_chunk(&mut stream).await.unwrap(),
        Bytes::from_static(b"last")
    );
}

struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// Peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_upload_and_download_stream_with_flat_memory() {
    let gib: u64 = 1 << 30;
    let s = sidecar("").await;
    let before = peak_rss_kib();
    // Download: the upstream produces 1 GiB in 64 KiB chunks; the client counts it.
    let resp = s
        .get(&plain(), "/big")
        .header("x-test-body-size", gib.to_string())
        .send()
        .await;
    let mut stream = Box::pin(resp.bytes_stream());
    let mut got = 0u64;
    while let Some(chunk) = next_chunk(&mut stream).await {
        got += chunk.len() as u64;
    }
    assert_eq!(got, gib);
    // Upload: the client sends 1 GiB as a stream; the upstream counts it.
    let body = reqwest::Body::wrap(streamed(gib));
    let resp = s
        .request(&plain(), reqwest::Method::POST, "/upload")
        .body(body)
        .send()
        .await;
    assert_eq!(seen(resp).await.body_len, gib);
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(
        grown_mib < 100,
        "peak RSS grew by {grown_mib} MiB while moving 2 GiB"
    );
}
