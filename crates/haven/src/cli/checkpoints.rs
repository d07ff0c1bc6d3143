//! `haven checkpoints list` and `haven restore`: both read a node's data directory
//! directly, so they work with the cluster down.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use clap::Subcommand;
use haven_checkpoint::catalog::Listed;
use haven_checkpoint::format;
use haven_service::apply::rfc3339;
use haven_service::restore;
use haven_service::restore::Progress;
use haven_service::restore::RestoreOptions;
use haven_service::restore::RestoreReport;
use haven_service::restore::Target;
use indicatif::ProgressBar;
use indicatif::ProgressStyle;
use serde::Serialize;

#[derive(Subcommand)]
pub enum CheckpointsCommand {
    /// List a node's checkpoints, oldest first.
    List {
        /// The node's data directory (`[node] data_dir`) or its service directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The service, when the node runs several (`[[service]] name`).
        #[arg(long)]
        service: Option<String>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Also read every file whole and check it against its checksum (listing reads
        /// only the trailers); a damaged one is shown as unreadable.
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_index", "to_time"])))]
pub struct RestoreArgs {
    /// The node's data directory (`[node] data_dir`) or its service directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The service, when the node runs several (`[[service]] name`).
    #[arg(long)]
    service: Option<String>,
    /// Restore the state as of this log index.
    #[arg(long)]
    to_index: Option<u64>,
    /// Restore the state as of this time (RFC 3339, e.g. 2026-11-22T10:00:00Z): the last
    /// entry the leader stamped at or before it.
    #[arg(long)]
    to_time: Option<String>,
    /// Where the app's state ends up; must be empty or absent.
    #[arg(long)]
    out: PathBuf,
    /// Replay the whole log into an empty app, ignoring checkpoints (a cross-check).
    #[arg(long)]
    from_scratch: bool,
    /// For an app Haven does not run: a fresh, empty instance to restore into.
    #[arg(long)]
    app_url: Option<String>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// One checkpoint as `list --json` prints it: its details, or why it cannot be read.
#[derive(Serialize)]
#[serde(untagged)]
enum ListedJson {
    Readable(CheckpointJson),
    Unreadable { file: PathBuf, unreadable: String },
}

#[derive(Serialize)]
struct CheckpointJson {
    index: u64,
    term: u64,
    time: String,
    created: String,
    mode: String,
    size: u64,
    app_bytes: u64,
    checksum: String,
    file: PathBuf,
}

/// The service's directory in a node's data directory, when `--service` names one.
fn in_service(data_dir: PathBuf, service: Option<&str>) -> PathBuf {
    match service {
        Some(name) => data_dir.join(name),
        None => data_dir,
    }
}

pub fn list(command: CheckpointsCommand) -> anyhow::Result<String> {
    let CheckpointsCommand::List {
        data_dir,
        service,
        json,
        verify,
    } = command;
    let mut listed = restore::list(&in_service(data_dir, service.as_deref()))?;
    if verify {
        for l in listed.iter_mut().filter(|l| l.info.is_ok()) {
            l.info = format::verify(&l.path);
        }
    }
    if json {
        let all: Vec<ListedJson> = listed.iter().map(to_json).collect();
        return Ok(format!("{}\n", serde_json::to_string(&all)?));
    }
    Ok(table(&listed))
}

fn to_json(listed: &Listed) -> ListedJson {
    let info = match &listed.info {
        Ok(info) => info,
        Err(e) => {
            return ListedJson::Unreadable {
                file: listed.path.clone(),
                unreadable: e.to_string(),
            };
        }
    };
    ListedJson::Readable(CheckpointJson {
        index: info.index,
        term: info.term,
        time: rfc3339(info.entry_time_us),
        created: rfc3339(info.created_us),
        mode: info.mode.to_string(),
        size: info.size,
        app_bytes: info.app_bytes,
        checksum: info.checksum.clone(),
        file: listed.path.clone(),
    })
}

fn table(listed: &[Listed]) -> String {
    let mut out = format!(
        "{:>12} {:>6} {:<27} {:<8} {:>12} {:>12} {}\n",
        "INDEX", "TERM", "TIME", "MODE", "SIZE", "APP BYTES", "CHECKSUM"
    );
    for l in listed {
        match &l.info {
            Ok(i) => out.push_str(&format!(
                "{:>12} {:>6} {:<27} {:<8} {:>12} {:>12} {}\n",
                i.index,
                i.term,
                rfc3339(i.entry_time_us),
                i.mode,
                i.size,
                i.app_bytes,
                i.checksum
            )),
            Err(e) => out.push_str(&format!("{:>12} unreadable: {e}\n", "?")),
        }
    }
    if listed.is_empty() {
        out.push_str("(no checkpoints)\n");
    }
    out
}

pub struct Bar(ProgressBar);

impl Default for Bar {
    /// A replay progress bar; indicatif draws nothing when stderr is not a terminal.
    fn default() -> Self {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "replaying {bar:40} {pos}/{len} entries ({per_sec}, eta {eta})",
        ) {
            bar.set_style(style);
        }
        Self(bar)
    }
}

impl Bar {
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, done: u64) {
        self.0.set_position(done);
    }
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<String> {
    let target = match (args.to_index, &args.to_time) {
        (Some(index), _) => Target::Index(index),
        (None, Some(time)) => Target::Time(parse_time(time)?),
        (None, None) => anyhow::bail!("give --to-index or --to-time"),
    };
    let options = RestoreOptions {
        data_dir: in_service(args.data_dir, args.service.as_deref()),
        target,
        out: args.out,
        from_scratch: args.from_scratch,
        app_url: args.app_url,
        check: None,
    };
    let progress = Bar::default();
    let report = restore::run(options, &progress).await;
    progress.finish();
    let report = report?;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string(&report)?));
    }
    Ok(summary(&report))
}

/// `--to-time`: RFC 3339, to microseconds since the Unix epoch.
pub fn parse_time(time: &str) -> anyhow::Result<i64> {
    let parsed = chrono::DateTime::parse_from_rfc3339(time).with_context(|| {
        format!("--to-time {time}: expected RFC 3339, e.g. 2026-11-22T10:00:00Z")
    })?;
    Ok(parsed.timestamp_micros())
}

pub fn summary(r: &RestoreReport) -> String {
    let base = match (&r.checkpoint_index, &r.checkpoint_file) {
        (Some(index), Some(file)) => format!("checkpoint {index} ({})", file.display()),
        _ => "an empty app (no checkpoint)".to_string(),
    };
    let rate = r.entries_replayed as f64 / r.replay_seconds.max(1e-9);
    format!(
        "restored index {} (entry time {}) into {}\nfrom {base}, then {} entries replayed in {:.2} s ({rate:.0} entries/s)\n",
        r.target_index,
        rfc3339(r.target_entry_time_us),
        r.out.display(),
        r.entries_replayed,
        r.replay_seconds
    )
}
