//! One typed client of a node's admin API, for the CLI, the cluster harness, the bench
//! and the tests: every endpoint once, its answer parsed, and every failure named with
//! the URL and what the node said.

use std::time::Duration;

use bytes::Bytes;
use haven_base::workers::WorkerInfo;
use haven_node::admin::AdminError;
use haven_node::admin::CheckpointTaken;
use haven_node::admin::Status;
use haven_node::admin::members::MembershipReply;
use haven_node::admin::reload::ReloadReport;
use haven_node::admin::site::Followed;
use haven_node::admin::site::Promoted;
use haven_node::admin::site::SiteRole;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::http::ClientError;
use crate::http::Http;
use crate::http::Reply;

/// A node's admin endpoint, and the service requests are about (the node's only one when
/// `None`).
#[derive(Clone)]
pub struct AdminClient {
    http: Http,
    base: String,
    service: Option<String>,
}

/// The environment variable the admin token is taken from.
pub const TOKEN_ENV: &str = "HAVEN_ADMIN_TOKEN";

impl AdminClient {
    /// `admin` as `host:port`, `http://host:port` or `https://host:port` (trusted by the
    /// CA that `HAVEN_CA_FILE` names).
    pub fn new(admin: &str, timeout: Duration) -> Self {
        let base = if admin.starts_with("http://") || admin.starts_with("https://") {
            admin.trim_end_matches('/').to_string()
        } else {
            format!("http://{admin}")
        };
        let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        Self {
            http: Http::new(timeout).trusting_env_ca().with_bearer(token),
            base,
            service: None,
        }
    }

    /// The same node, about `service`.
    pub fn service(&self, service: Option<&str>) -> Self {
        Self {
            service: service.map(str::to_string),
            ..self.clone()
        }
    }

    /// `http://ADMIN/path`, naming the service when there is one.
    pub fn url(&self, path: &str) -> String {
        match &self.service {
            Some(service) => format!("{}{path}?service={service}", self.base),
            None => format!("{}{path}", self.base),
        }
    }

    /// `GET /status`: the service's status on this node.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get_json(&self.url("/status")).await
    }

    /// `GET /services`: every service's status on this node.
    pub async fn services(&self) -> Result<Vec<Status>, ClientError> {
        self.get_json(&format!("{}/services", self.base)).await
    }

    /// `GET /workers`.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        self.get_json(&format!("{}/workers", self.base)).await
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        Ok(ok(self.http.get(&url).await?, &url)?.text())
    }

    /// The sum of the series of metric `name` with these labels (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, ClientError> {
        let page = self.metrics().await?;
        Ok(crate::metrics_text::sum(&page, name, labels).unwrap_or(0.0))
    }

    /// `POST /checkpoints`: the index once the checkpoint is on disk.
    pub async fn checkpoint(&self) -> Result<u64, ClientError> {
        let url = self.url("/checkpoints");
        let reply = ok(self.http.post(&url, Bytes::new()).await?, &url)?;
        let taken: CheckpointTaken = parse(&reply, &url)?;
        Ok(taken.index)
    }

    /// `POST /services/reload[?wipe=true]`.
    pub async fn reload(&self, wipe: bool) -> Result<ReloadReport, ClientError> {
        let url = format!("{}/services/reload?wipe={wipe}", self.base);
        let reply = self.http.post(&url, Bytes::new()).await?;
        parse(&ok(reply, &url)?, &url)
    }

    /// `POST /members/{change}` with `body`; the node's reason when it refuses.
    pub async fn membership<T: Serialize>(
        &self,
        change: &str,
        body: &T,
    ) -> Result<MembershipReply, ClientError> {
        let url = self.url(&format!("/members/{change}"));
        let headers = [("content-type", "application/json")];
        let body = serde_json::to_vec(body).map_err(|source| ClientError::Json {
            url: url.clone(),
            source,
        })?;
        let body = Bytes::from(body);
        let reply = self.http.send("POST", &url, &headers, body).await?;
        if reply.status == 200 {
            return parse(&reply, &url);
        }
        Err(reasoned(&reply, url))
    }

    /// `POST /site/promote`: fences the old primary and takes the service over at this
    /// standby site; answers once this node runs as the primary.
    pub async fn promote(&self) -> Result<Promoted, ClientError> {
        self.post_site("/site/promote").await
    }

    /// `POST /site/follow`: this node, of a site another took the service from, becomes a
    /// standby of the new primary; what only it held is exported first.
    pub async fn follow(&self) -> Result<Followed, ClientError> {
        self.post_site("/site/follow").await
    }

    /// `POST /site/handover`: this primary node takes no new writes (a switchover begins).
    pub async fn handover(&self) -> Result<SiteRole, ClientError> {
        self.post_site("/site/handover").await
    }

    /// `POST /site/resume`: a switchover is called off; this node takes writes again.
    pub async fn resume(&self) -> Result<SiteRole, ClientError> {
        self.post_site("/site/resume").await
    }

    async fn post_site<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        let reply = self.http.post(&url, Bytes::new()).await?;
        if reply.status == 200 {
            return parse(&reply, &url);
        }
        Err(reasoned(&reply, url))
    }

    async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, ClientError> {
        parse(&ok(self.http.get(url).await?, url)?, url)
    }
}

/// The reply if the node answered 200; otherwise what it said.
fn ok(reply: Reply, url: &str) -> Result<Reply, ClientError> {
    if reply.status != 200 {
        return Err(refused(&reply, url));
    }
    Ok(reply)
}

/// A refusal whose JSON body says why (`{"code": ..., "message": ...}`), else what the
/// node said.
fn reasoned(reply: &Reply, url: String) -> ClientError {
    match serde_json::from_slice::<AdminError>(&reply.body) {
        Ok(e) => ClientError::Refused {
            url,
            reason: e.message,
        },
        Err(_) => refused(reply, &url),
    }
}

fn refused(reply: &Reply, url: &str) -> ClientError {
    let body = match serde_json::from_slice::<AdminError>(&reply.body) {
        Ok(e) => e.message,
        Err(_) => reply.text().trim_end().to_string(),
    };
    ClientError::Status {
        url: url.to_string(),
        status: reply.status,
        body,
    }
}

fn parse<T: DeserializeOwned>(reply: &Reply, url: &str) -> Result<T, ClientError> {
    serde_json::from_slice(&reply.body).map_err(|source| ClientError::Json {
        url: url.to_string(),
        source,
    })
}
