//! Local receivers for Alertmanager's notifications: an HTTP sink (webhook and Slack) and an
//! SMTP sink (e-mail), both on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A POST received by the [`HttpSink`].
#[derive(Clone, Debug)]
pub struct Posted {
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Posted {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A tiny HTTP/1.1 server on `127.0.0.1:0` keeping every POSTed JSON body (Alertmanager's
/// webhook and Slack notifiers); answers 200 and closes the connection.
pub struct HttpSink {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Posted>>>,
    task: JoinHandle<()>,
}

impl HttpSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let store = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    if let Ok(Some(p)) = read_post(stream).await {
                        store.lock().unwrap().push(p);
                    }
                });
            }
        });
        Self {
            addr,
            received,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Posted> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_post(stream: TcpStream) -> std::io::Result<Option<Posted>> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await?;
    let mut stream = reader.into_inner();
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        .await?;
    stream.shutdown().await?;
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok(Some(Posted {
        path,
        headers,
        body,
    }))
}

/// A mail received by the [`SmtpSink`].
#[derive(Clone, Debug, Default)]
pub struct Mail {
    /// (user, password) from `AUTH PLAIN`.
    pub auth: Option<(String, String)>,
    pub from: String,
    pub to: Vec<String>,
    /// The message as sent (headers and MIME body), dot-stuffing removed.
    pub data: String,
}

impl Mail {
    /// A header's value (first occurrence, unfolded).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or_default();
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        unfolded.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// The message with its body's quoted-printable soft breaks and escapes decoded.
    pub fn decoded(&self) -> String {
        match self.data.split_once("\r\n\r\n") {
            Some((head, body)) => format!("{head}\r\n\r\n{}", quoted_printable_decode(body)),
            None => self.data.clone(),
        }
    }
}

/// A minimal SMTP server on `127.0.0.1:0` (EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT; no TLS),
/// enough for Alertmanager's e-mail notifier with `smtp_require_tls: false`.
pub struct SmtpSink {
    pub addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let store = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let _ = smtp_session(stream, store).await;
                });
            }
        });
        Self { addr, mails, task }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn smtp_session(stream: TcpStream, store: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let mut conn = BufReader::new(stream);
    conn.get_mut()
        .write_all(b"220 sink.test ESMTP ready\r\n")
        .await?;
    let mut mail = Mail::default();
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let line = line.trim_end().to_owned();
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250-sink.test\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n",
            "AUTH" => {
                // `AUTH PLAIN <base64(authzid \0 user \0 password)>`.
                let creds = line.split_whitespace().nth(2).unwrap_or_default();
                let raw = base64_decode(creds);
                let parts: Vec<String> = raw
                    .split(|b| *b == 0)
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                if let [_, user, pass] = parts.as_slice() {
                    mail.auth = Some((user.clone(), pass.clone()));
                }
                b"235 2.7.0 Authentication successful\r\n"
            }
            "MAIL" => {
                mail.from = line.clone();
                b"250 OK\r\n"
            }
            "RCPT" => {
                mail.to.push(line.clone());
                b"250 OK\r\n"
            }
            "DATA" => {
                conn.get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut data = String::new();
                loop {
                    let mut l = String::new();
                    if conn.read_line(&mut l).await? == 0 {
                        return Ok(());
                    }
                    if l == ".\r\n" || l == ".\n" {
                        break;
                    }
                    data.push_str(l.strip_prefix('.').unwrap_or(&l));
                }
                let auth = mail.auth.clone();
                store.lock().unwrap().push(Mail {
                    data,
                    ..std::mem::take(&mut mail)
                });
                mail.auth = auth;
                b"250 OK queued\r\n"
            }
            "QUIT" => {
                conn.get_mut().write_all(b"221 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"250 OK\r\n",
        };
        conn.get_mut().write_all(reply).await?;
    }
}

/// Standard base64 (padding optional); invalid characters are skipped.
pub fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Decodes quoted-printable text (`=\r\n` soft breaks, `=XX` bytes); other text passes.
pub fn quoted_printable_decode(s: &str) -> String {
    let s = s.replace("=\r\n", "").replace("=\n", "");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn decoders() {
    assert_eq!(base64_decode("AHVzZXIAcGFzcw=="), b"\0user\0pass");
    assert_eq!(quoted_printable_decode("a=3Db=\r\nc"), "a=bc");
}
