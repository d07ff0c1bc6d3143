//! What a drill asks of the restored app: HTTP checks (`GET /path STATUS`, optionally a
//! body substring or a JSON field) and user commands (exit 0 = pass), each with an
//! outcome that says exactly what was expected and what came.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use haven_base::checks::Expect;
use haven_base::checks::HttpCheck;
use haven_service::app::AppClient;
use serde::Deserialize;
use serde::Serialize;

/// How long one HTTP check may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a check command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// The end of a command's output kept in the report.
const OUTPUT_TAIL_BYTES: usize = 2_048;

/// Asks the app at `base_url`; the outcome says what came when it is not what was
/// expected.
pub async fn run_http(check: &HttpCheck, base_url: &str) -> CheckOutcome {
    let client = AppClient::new(base_url, HTTP_TIMEOUT);
    let answer = client
        .read(&check.method, &check.path, &[], Bytes::new())
        .await;
    let verdict = match answer {
        Err(e) => Err(format!("no answer: {e}")),
        Ok(r) if r.status != check.status => Err(format!(
            "status {} (expected {}); body: {}",
            r.status,
            check.status,
            excerpt(&r.body)
        )),
        Ok(r) => body_verdict(check, &r.body),
    };
    CheckOutcome::new(CheckKind::Http, check.describe(), verdict)
}

fn body_verdict(check: &HttpCheck, body: &[u8]) -> Result<String, String> {
    match &check.expect {
        None => Ok(format!("status {}", check.status)),
        Some(Expect::Contains(text)) => match String::from_utf8_lossy(body).contains(text) {
            true => Ok(format!("status {}, body contains {text:?}", check.status)),
            false => Err(format!(
                "the body does not contain {text:?}: {}",
                excerpt(body)
            )),
        },
        Some(Expect::JsonField { path, value }) => json_field(body, path, value),
    }
}
fn json_field(body: &[u8], path: &str, expected: &str) -> Result<String, String> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not JSON ({e}): {}", excerpt(body)))?;
    let found = path
        .split('.')
        .try_fold(&json, |value, key| match key.parse::<usize>() {
            Ok(i) => value.get(i),
            Err(_) => value.get(key),
        })
        .ok_or_else(|| format!("the body has no field {path}: {}", excerpt(body)))?;
    let wanted = serde_json::from_str(expected)
        .unwrap_or_else(|_| serde_json::Value::String(expected.to_string()));
    match *found == wanted {
        true => Ok(format!("{path} = {found}")),
        false => Err(format!("{path} = {found} (expected {wanted})")),
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

/// Runs `command` with `sh -c`; it passes when it exits 0 within [`COMMAND_TIMEOUT`]. It
/// gets the restored app's base URL in `HAVEN_DRILL_URL` and its data directory in
/// `HAVEN_DRILL_DIR`.
pub async fn run_command(command: &str, base_url: &str, data_dir: &Path) -> CheckOutcome {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("HAVEN_DRILL_URL", base_url)
        .env("HAVEN_DRILL_DIR", data_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let verdict = match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Err(_) => Err(format!("still running after {COMMAND_TIMEOUT:?}: killed")),
        Ok(Err(e)) => Err(format!("cannot run it: {e}")),
        Ok(Ok(output)) => {
            let mut text = output.stdout;
            text.extend_from_slice(&output.stderr);
            let tail = tail(&text);
            match output.status.success() {
                true => Ok(format!("exit 0{tail}")),
                false => Err(format!("{}{tail}", output.status)),
            }
        }
    };
    CheckOutcome::new(CheckKind::Command, command.to_string(), verdict)
}

fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let start = text.len().saturating_sub(OUTPUT_TAIL_BYTES);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    format!("; output: {}", &text[start..])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Haven's own: the restore was verified (objects authenticated, checkpoint checksums,
    /// index continuity) and the app answered.
    Builtin,
    Http,
    Command,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOutcome {
    pub kind: CheckKind,
    pub name: String,
    pub ok: bool,
    /// What was found (passed) or what went wrong (failed).
    pub detail: String,
}

impl CheckOutcome {
    pub fn new(kind: CheckKind, name: String, verdict: Result<String, String>) -> Self {
        let (ok, detail) = match verdict {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        Self {
            kind,
            name,
            ok,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_compare_as_json_or_as_text() {
        let body = br#"{"count": 42, "name": "orders", "items": [{"n": 3}]}"#;
        assert!(json_field(body, "count", "42").is_ok());
        assert!(json_field(body, "name", "orders").is_ok());
        assert!(json_field(body, "items.0.n", "3").is_ok());
        assert_eq!(
            json_field(body, "count", "41").unwrap_err(),
            "count = 42 (expected 41)"
        );
        assert!(
            json_field(body, "missing", "1")
                .unwrap_err()
                .starts_with("the body has no field missing")
        );
        assert!(
            json_field(b"nope", "a", "1")
                .unwrap_err()
                .starts_with("the body is not JSON")
        );
    }

    #[tokio::test]
    async fn a_command_passes_on_exit_0_and_fails_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let passed = run_command(
            "test \"$HAVEN_DRILL_URL\" = http://x",
            "http://x",
            dir.path(),
        )
        .await;
        assert!(passed.ok, "{passed:?}");
        let failed = run_command("echo counted 41; exit 3", "http://x", dir.path()).await;
        assert!(!failed.ok);
        assert_eq!(failed.detail, "exit status: 3; output: counted 41");
    }
}
