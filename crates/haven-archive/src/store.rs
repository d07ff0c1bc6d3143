//! The object store behind an archive URL, with every call bounded in time: a dead store
//! must cost the uploader a timeout and a retry, never a hung task.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::TryStreamExt;
use object_store::BackoffConfig;
use object_store::ClientOptions;
use object_store::ObjectStore;
use object_store::ObjectStoreExt;
use object_store::PutMode;
use object_store::PutPayload;
use object_store::RetryConfig;
use object_store::WriteMultipart;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;

use crate::ArchiveError;

/// One call to the store (a small put, a get, one page of a list).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a streamed upload hands the store per part (S3's minimum part is 5 MiB).
const PART_LEN: usize = 8 << 20;

/// Where an archive lives and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct StoreSettings {
    /// `s3://bucket/prefix` or `file:///path`.
    pub url: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:8333`); AWS's own when absent.
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub size: u64,
}

/// Whether a create-only write made the object or found one already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    Exists,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: StorePath,
    url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    /// S3 credentials and region come from the usual `AWS_*` variables.
    pub fn open(settings: &StoreSettings) -> Result<Self, ArchiveError> {
        let url = settings.url.clone();
        let bad = |reason: &str| ArchiveError::Url {
            url: url.clone(),
            reason: reason.to_string(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file:// url needs an absolute path (file:///dir)"));
            }
            std::fs::create_dir_all(path).map_err(ArchiveError::io(format!(
                "cannot create archive directory {path}"
            )))?;
            let local = LocalFileSystem::new_with_prefix(path)
                .map_err(|e| bad(&format!("cannot use the directory: {e}")))?;
            return Ok(Self {
                inner: Arc::new(local),
                prefix: StorePath::default(),
                url,
            });
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(bad("expected s3://bucket/prefix or file:///path"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket after s3://"));
        }
        let s3 = s3_builder(bucket, settings.endpoint.as_deref())
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            inner: Arc::new(s3),
            prefix: StorePath::from(prefix.trim_matches('/')),
            url,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> StorePath {
        let full = match self.prefix.as_ref() {
            "" => name.to_string(),
            prefix => format!("{prefix}/{name}"),
        };
        StorePath::from(full)
    }

    fn name_of(&self, path: &StorePath) -> String {
        let full = path.as_ref();
        match self.prefix.as_ref() {
            "" => full.to_string(),
            prefix => full
                .strip_prefix(prefix)
                .map_or(full, |rest| rest.trim_start_matches('/'))
                .to_string(),
        }
    }

    /// Writes `name` only if nothing is there: the one atomic step the archive relies on.
    pub async fn create(&self, name: &str, bytes: Vec<u8>) -> Result<Created, ArchiveError> {
        let path = self.path(name);
        let put = self
            .inner
            .put_opts(&path, PutPayload::from(bytes), PutMode::Create.into());
        match bounded("create", name, put).await {
            Ok(_) => Ok(Created::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Created::Exists),
            Err(source) => Err(failed("create", name, source)),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, ArchiveError> {
        let path = self.path(name);
        let body = async { self.inner.get(&path).await?.bytes().await };
        bounded("get", name, body)
            .await
            .map_err(|source| failed("get", name, source))
    }

    /// `name`'s content, or `None` when there is no such object.
    pub async fn get_if_exists(&self, name: &str) -> Result<Option<Bytes>, ArchiveError> {
        let path = self.path(name);
        let body = async { self.inner.get(&path).await?.bytes().await };
        match bounded("get", name, body).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(failed("get", name, source)),
        }
    }

    /// The objects under `dir` whose names sort after `after`, in name order.
    pub async fn list(&self, dir: &str, after: Option<&str>) -> Result<Vec<Listed>, ArchiveError> {
        let prefix = self.path(dir.trim_end_matches('/'));
        let stream = match after {
            Some(after) => self
                .inner
                .list_with_offset(Some(&prefix), &self.path(after)),
            None => self.inner.list(Some(&prefix)),
        };
        let listed = stream
            .map_ok(|meta| Listed {
                name: self.name_of(&meta.location),
                size: meta.size,
            })
            .try_collect::<Vec<_>>();
        let mut listed = bounded("list", dir, listed)
            .await
            .map_err(|source| failed("list", dir, source))?;
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }

    pub async fn delete(&self, name: &str) -> Result<(), ArchiveError> {
        let path = self.path(name);
        match bounded("delete", name, self.inner.delete(&path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(failed("delete", name, source)),
        }
    }

    /// Streams a large object up in parts; it appears whole when `finish` returns.
    pub async fn upload(&self, name: &str) -> Result<Upload, ArchiveError> {
        let path = self.path(name);
        let upload = bounded("upload", name, self.inner.put_multipart(&path))
            .await
            .map_err(|source| failed("upload", name, source))?;
        Ok(Upload {
            name: name.to_string(),
            writer: WriteMultipart::new_with_chunk_size(upload, PART_LEN),
        })
    }

    /// A large object's bytes as they arrive.
    pub async fn get_stream(
        &self,
        name: &str,
    ) -> Result<impl futures::Stream<Item = Result<Bytes, ArchiveError>> + use<>, ArchiveError>
    {
        let path = self.path(name);
        let result = bounded("get", name, self.inner.get(&path))
            .await
            .map_err(|source| failed("get", name, source))?;
        let name = name.to_string();
        Ok(result
            .into_stream()
            .map(move |chunk| chunk.map_err(|source| failed("get", &name, source))))
    }
}

pub struct Upload {
    name: String,
    writer: WriteMultipart,
}

impl Upload {
    /// Waits while too many parts are in flight, so memory stays bounded.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        let name = self.name.clone();
        bounded("upload", &name, self.writer.wait_for_capacity(4))
            .await
            .map_err(|source| failed("upload", &name, source))?;
        self.writer.write(bytes);
        Ok(())
    }

    pub async fn finish(self) -> Result<(), ArchiveError> {
        let name = self.name;
        bounded("upload", &name, self.writer.finish())
            .await
            .map(|_| ())
            .map_err(|source| failed("upload", &name, source))
    }
}

fn s3_builder(bucket: &str, endpoint: Option<&str>) -> AmazonS3Builder {
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 2,
        retry_timeout: CALL_TIMEOUT,
    };
    let client = ClientOptions::new()
        .with_timeout(CALL_TIMEOUT)
        .with_connect_timeout(Duration::from_secs(2));
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry)
        .with_client_options(client);
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    if let Some(endpoint) = endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    builder
}

fn failed(op: &'static str, name: &str, source: object_store::Error) -> ArchiveError {
    match source {
        object_store::Error::Generic {
            store: "timeout", ..
        } => ArchiveError::Timeout {
            op,
            name: name.to_string(),
            seconds: CALL_TIMEOUT.as_secs(),
        },
        source => ArchiveError::Store {
            op,
            name: name.to_string(),
            source,
        },
    }
}

/// Runs one store call under [`CALL_TIMEOUT`]; a timeout comes back as the store's own
/// error type so callers handle one kind.
async fn bounded<T>(
    op: &'static str,
    name: &str,
    call: impl Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(object_store::Error::Generic {
            store: "timeout",
            source: format!("{op} {name}: no answer within {} s", CALL_TIMEOUT.as_secs()).into(),
        }),
    }
}

/// rustls needs one process-wide crypto provider; Haven uses ring (no C build of aws-lc).
/// rustls deprecated ring's provider for lacking post-quantum key exchange; S3 over TLS
/// with classical key exchange is what every S3 endpoint offers today.
#[allow(deprecated)]
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
