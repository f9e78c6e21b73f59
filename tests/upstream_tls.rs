#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The built `llm-audit serve` in front of an HTTPS upstream, as every hosted provider is: the
//! certificate is verified against the system's roots (`SSL_CERT_FILE` here names a test CA),
//! HTTP/2 is negotiated by ALPN, JSON and streamed answers pass, and an upstream whose
//! certificate nobody vouches for is a recorded 502, never a silent downgrade.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

use support::{Lines, Reap, llm_audit, serve_args};

const ANSWER: &str = r#"{"id":"chatcmpl-tls","object":"chat.completion","created":1764000000,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"over TLS"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#;
const KEY: &str = "sk-proj-tLsKeY0123456789abcdefABCDEFghijkl";

/// What the upstream saw of each request: protocol version and `Authorization`.
type Seen = Arc<Mutex<Vec<(Version, Option<String>)>>>;

/// A test CA (PEM file in `dir`) and a `localhost` server certificate it signed.
fn certificates(dir: &Path) -> (PathBuf, CertificateDer<'static>, PrivateKeyDer<'static>) {
    certificates_for(dir, "localhost")
}

fn certificates_for(
    dir: &Path,
    host: &str,
) -> (PathBuf, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "llm-audit test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![host.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    (ca_pem, leaf.der().clone(), key)
}

async fn answer(req: Request<Incoming>, seen: Seen) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    seen.lock().unwrap().push((req.version(), auth));
    let body = req.into_body().collect().await?.to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if body["stream"] == true {
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-tls", "object": "chat.completion.chunk", "model": "gpt-4.1-mini",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let mut sse = chunk(json!({"content": "over "}), Value::Null);
        sse += &chunk(json!({"content": "TLS"}), Value::Null);
        sse += &chunk(json!({}), json!("stop"));
        sse += "data: {\"id\":\"chatcmpl-tls\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\n";
        sse += "data: [DONE]\n\n";
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from(sse)))
            .unwrap());
    }
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(ANSWER.as_bytes())))
        .unwrap())
}

/// An HTTPS upstream on a free loopback port offering HTTP/2 and HTTP/1.1.
async fn https_upstream(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> (u16, Seen) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), seen2.clone());
            tokio::spawn(async move {
                // A client that rejects our certificate ends the handshake: not an error here.
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req| answer(req, seen.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, seen)
}

/// `llm-audit serve` in front of `upstream`, with `SSL_CERT_FILE` when given.
async fn serve(dir: &Path, upstream: &str, cert_file: Option<&Path>) -> (Reap, SocketAddr) {
    serve_with(dir, upstream, cert_file, &[]).await
}

async fn serve_with(
    dir: &Path,
    upstream: &str,
    cert_file: Option<&Path>,
    envs: &[(&str, &str)],
) -> (Reap, SocketAddr) {
    let mut cmd = llm_audit();
    serve_args(&mut cmd, upstream, &dir.join("audit.db"))
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(f) = cert_file {
        cmd.env("SSL_CERT_FILE", f);
    }
    let mut child = cmd.spawn().unwrap();
    let lines = Lines::read(child.stderr.take().unwrap());
    let addr = lines.wait_for(Duration::from_secs(20), |l| {
        l.strip_prefix("listening on http://")?.trim().parse().ok()
    });
    let Some(addr) = addr else {
        panic!("no listening line:\n{}", lines.so_far());
    };
    // `Lines`' reader thread keeps draining stderr after this, so the proxy never blocks on it.
    (Reap(child), addr)
}

fn rows(db: &Path) -> Vec<(i64, String, Option<String>)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT status_code, outcome, error_message FROM audit_logs ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Rows are committed within the flush interval.
async fn wait_rows(db: &Path, n: usize) -> Vec<(i64, String, Option<String>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = rows(db);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A chat call to the proxy at `addr` with the client's key.
async fn post_chat(addr: SocketAddr, stream: bool) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat(stream))
        .send()
        .await
        .unwrap()
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4.1-mini", "stream": stream,
           "messages": [{"role": "user", "content": "Say something over TLS."}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_verified_and_spoken_to_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert, key) = certificates(dir.path());
    let (port, seen) = https_upstream(cert, key).await;
    let (_proxy, addr) = serve(
        dir.path(),
        &format!("https://localhost:{port}/v1"),
        Some(&ca_pem),
    )
    .await;
    let resp = post_chat(addr, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), ANSWER, "bytes pass unchanged");

    let resp = post_chat(addr, true).await;
    assert_eq!(resp.status(), 200);
    let sse = resp.text().await.unwrap();
    assert!(sse.contains("\"over \"") && sse.contains("[DONE]"), "{sse}");
    assert!(
        !sse.contains("\"usage\""),
        "the injected usage chunk stays hidden: {sse}"
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (version, auth) in &seen {
        assert_eq!(*version, Version::HTTP_2, "ALPN chose h2");
        assert_eq!(auth.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    }
    let rows = wait_rows(&dir.path().join("audit.db"), 2).await;
    assert_eq!(
        rows.iter()
            .map(|(s, o, _)| (*s, o.as_str()))
            .collect::<Vec<_>>(),
        [(200, "ok"), (200, "ok")],
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_nobody_vouches_for_is_a_recorded_502() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca_pem, cert, key) = certificates(dir.path());
    let (port, seen) = https_upstream(cert, key).await;
    // The system's roots only: the test CA is not among them.
    let (_proxy, addr) = serve(dir.path(), &format!("https://localhost:{port}/v1"), None).await;
    let resp = post_chat(addr, false).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap().to_owned();
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert!(
        message.to_lowercase().contains("certificate"),
        "the reason is named: {message}"
    );
    assert!(seen.lock().unwrap().is_empty(), "no request got through");
    let rows = wait_rows(&dir.path().join("audit.db"), 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].0, rows[0].1.as_str()), (502, "error"));
    assert_eq!(rows[0].2.as_deref(), Some(message.as_str()));
}

/// An HTTP CONNECT proxy on a free loopback port that tunnels every host to 127.0.0.1 and
/// remembers the targets it was asked for.
async fn connect_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let asked2 = asked.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let asked = asked2.clone();
            tokio::spawn(async move {
                let mut client = tokio::io::BufReader::new(tcp);
                let mut line = String::new();
                client.read_line(&mut line).await.unwrap();
                // "CONNECT host:port HTTP/1.1"; then headers up to a blank line.
                let target = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                loop {
                    let mut h = String::new();
                    client.read_line(&mut h).await.unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                asked.lock().unwrap().push(target.clone());
                let port = target.rsplit(':').next().unwrap_or_default();
                let mut upstream = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                    .await
                    .unwrap();
                client
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (port, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_from_the_environment_tunnels_to_a_remote_upstream() {
    let dir = tempfile::tempdir().unwrap();
    // A name only the tunnel resolves: the proxy, not llm-audit, connects to it.
    let (ca_pem, cert, key) = certificates_for(dir.path(), "api.upstream.test");
    let (port, seen) = https_upstream(cert, key).await;
    let (proxy_port, asked) = connect_proxy().await;
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    let (_proxy, addr) = serve_with(
        dir.path(),
        &format!("https://api.upstream.test:{port}/v1"),
        Some(&ca_pem),
        &[("HTTPS_PROXY", &proxy_url)],
    )
    .await;
    let resp = post_chat(addr, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), ANSWER);
    assert_eq!(
        asked.lock().unwrap().clone(),
        [format!("api.upstream.test:{port}")]
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    let rows = wait_rows(&dir.path().join("audit.db"), 1).await;
    assert_eq!((rows[0].0, rows[0].1.as_str()), (200, "ok"));
}
