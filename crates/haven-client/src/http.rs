//! A small HTTP/1.1 keep-alive client for the demo, the status command and the tests.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use haven_base::errors::chain;
use haven_base::tls;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A response kept whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// `Authorization` sent with every request, when set.
    authorization: Option<String>,
    /// Why `https://` URLs cannot be reached (no CA given, or a bad one); none: they can.
    https_refusal: Option<String>,
}

/// The environment variable naming the CA certificate (PEM) that `https://` nodes are
/// trusted by: the `[tls] ca` of their cluster.
pub const CA_ENV: &str = "HAVEN_CA_FILE";

impl Http {
    /// Plain HTTP; `https://` URLs are refused until [`Self::trusting`] names a CA.
    pub fn new(timeout: Duration) -> Self {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let mut http = match config {
            Ok(config) => Self::with_tls_config(timeout, config),
            Err(e) => unreachable!("ring's default protocol versions are safe: {e}"),
        };
        http.https_refusal = Some(format!(
            "https needs the cluster's CA certificate: set {CA_ENV}"
        ));
        http
    }

    fn with_tls_config(timeout: Duration, config: rustls::ClientConfig) -> Self {
        let mut plain = HttpConnector::new();
        plain.set_nodelay(true);
        plain.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(plain);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
            authorization: None,
            https_refusal: None,
        }
    }

    /// `https://` URLs trusted by the CA certificate in `ca` (no client certificate).
    /// A CA that cannot be read makes every `https://` request fail with the reason.
    pub fn trusting(self, ca: &Path) -> Self {
        let authorization = self.authorization.clone();
        match tls::trusting(ca) {
            Ok(config) => Self {
                authorization,
                ..Self::with_tls_config(self.timeout, config)
            },
            Err(e) => Self {
                https_refusal: Some(format!("{CA_ENV}: {e}")),
                ..self
            },
        }
    }

    /// [`Self::trusting`] the CA named by `HAVEN_CA_FILE`, when it is set.
    pub fn trusting_env_ca(self) -> Self {
        match std::env::var_os(CA_ENV).filter(|ca| !ca.is_empty()) {
            Some(ca) => self.trusting(Path::new(&ca)),
            None => self,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request when a token is given.
    pub fn with_bearer(mut self, token: Option<String>) -> Self {
        self.authorization = token.map(|t| format!("Bearer {t}"));
        self
    }

    pub async fn get(&self, url: &str) -> Result<Reply, ClientError> {
        self.send("GET", url, &[], Bytes::new()).await
    }

    pub async fn post(&self, url: &str, body: impl Into<Bytes>) -> Result<Reply, ClientError> {
        self.send("POST", url, &[], body.into()).await
    }

    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, ClientError> {
        let failed = |reason: String| ClientError::Request {
            method: method.to_string(),
            url: url.to_string(),
            reason,
        };
        if let Some(reason) = self
            .https_refusal
            .as_ref()
            .filter(|_| url.starts_with("https://"))
        {
            return Err(failed(reason.clone()));
        }
        let mut builder = http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(authorization) = &self.authorization {
            builder = builder.header(http::header::AUTHORIZATION, authorization.as_str());
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| failed(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| failed(chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| failed(chain(&e)))?
                .to_bytes();
            Ok(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| failed(format!("no answer within {:?}", self.timeout)))?
    }
}

/// Why a call to a node failed, with the URL in every message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{method} {url}: {reason}")]
    Request {
        method: String,
        url: String,
        reason: String,
    },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} sent invalid JSON: {source}")]
    Json {
        url: String,
        source: serde_json::Error,
    },
    #[error("{url}: {reason}")]
    Refused { url: String, reason: String },
}
