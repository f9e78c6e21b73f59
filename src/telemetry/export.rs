//! The span exporter behind the SDK's batch processor: each batch is encoded in one pass
//! ([`otlp_wire`](super::otlp_wire)) and sent over OTLP/gRPC (tonic, raw-bytes codec) or
//! OTLP/HTTP with protobuf bodies (hyper-util's client).
//!
//! Not opentelemetry-otlp's exporter: converting `SpanData` into the generated protobuf
//! structs and letting prost encode them costs ~40k instructions per span (prost recomputes the
//! length of every nested message at each level), a quarter of the proxy's whole CPU per call
//! (callgrind, 2026-11-26). The wire format and the transports stay the standard ones; tests
//! decode what a real gRPC and a real HTTP receiver get with the reference protobuf types.
//!
//! The batch processor calls `export` on its own thread, outside any Tokio runtime; the network
//! part runs as a task on the runtime the exporter was built in.

use std::time::{Duration, Instant};

use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use bytes::{Buf as _, BufMut as _, Bytes};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{OtlpProtocol, TelemetryConfig, TelemetryError};
use crate::wire::PooledClient;

const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Attempts per batch for errors the OTLP specification calls retryable.
const ATTEMPTS: u32 = 4;

/// OTLP span exporter with a one-pass encoder.
#[derive(Debug)]
pub struct WireExporter {
    resource: Resource,
    transport: Transport,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

#[derive(Clone, Debug)]
enum Transport {
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
        gzip: bool,
    },
    Http(Box<HttpTarget>),
}

#[derive(Clone, Debug)]
struct HttpTarget {
    client: PooledClient<hyper_rustls::HttpsConnector<HttpConnector>>,
    uri: Uri,
    headers: HeaderMap,
    gzip: bool,
}

impl WireExporter {
    /// An exporter for `cfg` (which names an endpoint). Must run inside a Tokio runtime: the
    /// connections live on it.
    pub fn new(cfg: &TelemetryConfig, endpoint: &str) -> Result<Self, TelemetryError> {
        let bad = |why: String| TelemetryError::Exporter(why);
        // opentelemetry-otlp's reading of an endpoint without a scheme: https.
        let endpoint = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("https://{endpoint}")
        };
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| bad(format!("invalid OTLP endpoint {endpoint:?}: {e}")))?;
        let https = uri.scheme_str() == Some("https");
        // `OTEL_EXPORTER_OTLP_HEADERS`: HTTP headers, or gRPC metadata (the same on the wire).
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| bad(format!("invalid OTLP header name {k:?}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| bad(format!("invalid value for OTLP header {k:?}")))?;
            headers.append(name, value);
        }
        let transport = match cfg.protocol {
            OtlpProtocol::Grpc => {
                let mut ep = Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| bad(format!("invalid OTLP endpoint {endpoint:?}: {e}")))?
                    .tcp_nodelay(true)
                    .connect_timeout(cfg.timeout);
                if https {
                    ep = ep
                        .tls_config(ClientTlsConfig::new().with_native_roots())
                        .map_err(|e| bad(format!("OTLP TLS set-up: {e}")))?;
                }
                Transport::Grpc {
                    channel: ep.connect_lazy(),
                    metadata: MetadataMap::from_headers(headers),
                    gzip: cfg.gzip,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                let client = crate::wire::https(crate::wire::http_connector(cfg.timeout))
                    .map(crate::wire::pooled)
                    .map_err(|e| bad(format!("OTLP TLS set-up: {e}")))?;
                let mut headers = headers;
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                if cfg.gzip {
                    headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                Transport::Http(Box::new(HttpTarget {
                    client,
                    uri,
                    headers,
                    gzip: cfg.gzip,
                }))
            }
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| bad("the OTLP exporter needs a Tokio runtime".into()))?;
        Ok(Self {
            resource: Resource::builder_empty().build(),
            transport,
            runtime,
            timeout: cfg.timeout,
        })
    }
}

impl SpanExporter for WireExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(batch.len() * 768);
        super::otlp_wire::encode_export_request(&batch, &self.resource, &mut buf);
        drop(batch);
        let body = Bytes::from(buf);
        let transport = self.transport.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let deadline = Instant::now() + timeout;
            match tokio::time::timeout(timeout, transport.send_with_retries(body, deadline)).await {
                Ok(result) => result,
                Err(_) => Err(format!("OTLP export timed out after {timeout:?}")),
            }
        });
        match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(OTelSdkError::InternalFailure(message)),
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        }
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }
}

/// One try's failure: whether the OTLP specification lets us try again.
struct Failure {
    retryable: bool,
    message: String,
}

impl Transport {
    async fn send_with_retries(&self, body: Bytes, deadline: Instant) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.send(body.clone()).await {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            // Exponential back-off with jitter, never past the export timeout.
            let delay =
                Duration::from_millis(100 * (1 << (attempt - 1))).mul_f64(0.5 + fastrand::f64());
            if !failure.retryable || attempt >= ATTEMPTS || Instant::now() + delay >= deadline {
                return Err(failure.message);
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn send(&self, body: Bytes) -> Result<(), Failure> {
        match self {
            Transport::Grpc {
                channel,
                metadata,
                gzip,
            } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                if *gzip {
                    grpc = grpc.send_compressed(CompressionEncoding::Gzip);
                }
                grpc.ready().await.map_err(|e| Failure {
                    retryable: true,
                    message: crate::wire::error_chain(&e),
                })?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                let path = axum::http::uri::PathAndQuery::from_static(GRPC_PATH);
                match grpc.unary(request, path, RawCodec).await {
                    Ok(_) => Ok(()),
                    Err(status) => Err(Failure {
                        // OTLP/gRPC: these codes are transient, the rest are not.
                        retryable: matches!(
                            status.code(),
                            tonic::Code::Cancelled
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::Aborted
                                | tonic::Code::OutOfRange
                                | tonic::Code::Unavailable
                                | tonic::Code::DataLoss
                        ),
                        message: format!(
                            "OTLP/gRPC export failed: {:?}: {}",
                            status.code(),
                            status.message()
                        ),
                    }),
                }
            }
            Transport::Http(target) => {
                let HttpTarget {
                    client,
                    uri,
                    headers,
                    gzip,
                } = &**target;
                let body = if *gzip { gzip_bytes(&body) } else { body };
                let mut request = Request::new(Full::new(body));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = uri.clone();
                *request.headers_mut() = headers.clone();
                let response = client.request(request).await.map_err(|e| Failure {
                    retryable: true,
                    message: format!("OTLP/HTTP export failed: {}", crate::wire::error_chain(&e)),
                })?;
                let status = response.status();
                // Read the answer to the end so the connection goes back to the pool.
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(Failure {
                        // OTLP/HTTP: 429, 502, 503 and 504 are transient.
                        retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                        message: format!("OTLP/HTTP export failed: HTTP {status}"),
                    })
                }
            }
        }
    }
}

fn gzip_bytes(body: &[u8]) -> Bytes {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    Bytes::from(enc.finish().unwrap_or_default())
}

/// A tonic codec for bytes already in protobuf form; the answer
/// (`ExportTraceServiceResponse`) is read and not interpreted.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}
