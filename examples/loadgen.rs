//! Load generator for `bench/load.sh`: closed loop (`--concurrency N`) or open loop at a fixed
//! rate (`--rate R`, latency measured from each request's scheduled start, so a stall is not
//! hidden by coordinated omission). For `--stream` it also reports the time to the first body
//! chunk. Prints one JSON line.
//!
//! `cargo run --release --example loadgen -- URL [--concurrency 1 | --rate 1000] [--duration 10] [--stream]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::sync::Mutex;

const BODY: &str = r#"{"model":"gpt-4.1-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something short about benchmarks."}],"max_tokens":16,"user":"bench-user"}"#;

#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    first_chunk: Vec<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: loadgen URL [flags]"))?;
    let (mut concurrency, mut rate, mut duration, mut stream) = (1usize, 0f64, 10f64, false);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--stream" => stream = true,
            "--concurrency" => concurrency = args.next().unwrap_or_default().parse()?,
            "--rate" => rate = args.next().unwrap_or_default().parse()?,
            "--duration" => duration = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let body = if stream {
        BODY.replacen('{', "{\"stream\":true,", 1)
    } else {
        BODY.to_owned()
    };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .build()?;
    let samples = Arc::new(Mutex::new(Samples::default()));
    let errors = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs_f64(duration);
    let started = Instant::now();

    // Warm the connection pool so connection set-up is not measured.
    for _ in 0..concurrency.max(8) {
        let _ = one(&client, &url, &body, Instant::now()).await;
    }

    if rate > 0.0 {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut tasks = Vec::new();
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < run_for {
            let scheduled = t0 + interval.mul_f64(n as f64);
            tokio::time::sleep_until(scheduled.into()).await;
            let (c, u, b, s, e) = (
                client.clone(),
                url.clone(),
                body.clone(),
                samples.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                record(one(&c, &u, &b, scheduled).await, &s, &e).await
            }));
            n += 1;
        }
        for t in tasks {
            let _ = t.await;
        }
    } else {
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (c, u, b, s, e) = (
                client.clone(),
                url.clone(),
                body.clone(),
                samples.clone(),
                errors.clone(),
            );
            workers.push(tokio::spawn(async move {
                while started.elapsed() < run_for {
                    record(one(&c, &u, &b, Instant::now()).await, &s, &e).await;
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut s = samples.lock().await;
    let n = s.total.len();
    let (p50, p99) = percentiles(&mut s.total);
    let (f50, f99) = percentiles(&mut s.first_chunk);
    println!(
        "{{\"requests\":{n},\"errors\":{},\"rps\":{:.1},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"first_chunk_p50_ms\":{f50:.3},\"first_chunk_p99_ms\":{f99:.3}}}",
        errors.load(Ordering::Relaxed),
        n as f64 / elapsed
    );
    Ok(())
}

/// One request: (total, time to first body chunk), both from `scheduled`.
async fn one(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    scheduled: Instant,
) -> anyhow::Result<(Duration, Duration)> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench-0000000000000000000000")
        .body(body.to_owned())
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let mut stream = resp.bytes_stream();
    let mut first = None;
    while let Some(chunk) = stream.next().await {
        chunk?;
        first.get_or_insert_with(|| scheduled.elapsed());
    }
    let total = scheduled.elapsed();
    Ok((total, first.unwrap_or(total)))
}

async fn record(
    result: anyhow::Result<(Duration, Duration)>,
    samples: &Mutex<Samples>,
    errors: &AtomicU64,
) {
    match result {
        Ok((total, first)) => {
            let mut s = samples.lock().await;
            s.total.push(total.as_secs_f64() * 1000.0);
            s.first_chunk.push(first.as_secs_f64() * 1000.0);
        }
        Err(_) => {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn percentiles(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}
