//! A fast fake OpenAI upstream for the proxy load benchmark (`bench/load.sh`): answers
//! `POST /v1/chat/completions` at once with a fixed `chat.completion` (or, for `"stream":true`,
//! an SSE stream of `--chunks` events, then usage if asked, then `[DONE]`).
//!
//! `cargo run --release --example bench_upstream -- 127.0.0.1:18080 [--chunks 8] [--chunk-gap-ms 0]`

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt as _;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764000000,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"Short benchmark answer.","refusal":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":5,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18080".into())
        .parse()?;
    let mut chunks = 8usize;
    let mut gap = Duration::ZERO;
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--chunks" => chunks = value.parse()?,
            "--chunk-gap-ms" => gap = Duration::from_millis(value.parse()?),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |body: Bytes| async move { answer(&body, chunks, gap) }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("bench upstream on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

fn answer(body: &[u8], chunks: usize, gap: Duration) -> Response {
    let text = std::str::from_utf8(body).unwrap_or("");
    if !text.contains("\"stream\":true") {
        return ([("content-type", "application/json")], ANSWER).into_response();
    }
    let usage = text.contains("\"include_usage\":true");
    let mut events: Vec<String> = (0..chunks)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4.1-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
            )
        })
        .collect();
    events.push("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4.1-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".into());
    if usage {
        events.push("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4.1-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":24,\"completion_tokens\":8,\"total_tokens\":32}}\n\n".into());
    }
    events.push("data: [DONE]\n\n".into());
    let stream = futures_util::stream::iter(events).then(move |e| async move {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        Ok::<_, std::convert::Infallible>(e)
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}
