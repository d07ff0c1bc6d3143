//! `haven archive keygen|ls|verify|restore`: work on a fresh machine with nothing but the
//! archive, its key and the object store's credentials (the usual `AWS_*` variables).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use clap::Subcommand;
use haven_archive::catalog::Catalog;
use haven_archive::key::ArchiveKey;
use haven_archive::reader;
use haven_archive::reader::Reader;
use haven_archive::reader::Verification;
use haven_archive::seal::Protection;
use haven_archive::store::Store;
use haven_archive::store::StoreSettings;
use haven_base::config::Config;
use haven_base::config::Limits;
use haven_checkpoint::format;
use haven_contract::paths;
use haven_service::apply::rfc3339;
use haven_service::restore;
use haven_service::restore::AppSettings;
use haven_service::restore::ArchiveRestore;
use haven_service::restore::RestoreOptions;
use haven_service::restore::Target;
use serde::Serialize;

use super::checkpoints::Bar;
use super::checkpoints::parse_time;
use super::checkpoints::summary;

#[derive(Subcommand)]
pub enum ArchiveCommand {
    /// Print a new archive key: `haven archive keygen > archive.key` (keep a copy off
    /// site: without it the archive cannot be read).
    Keygen,
    /// List an archive's checkpoints and log objects, with their indexes and times.
    Ls {
        #[command(flatten)]
        source: Source,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Read and authenticate every object, compare them with the manifests and check the
    /// log runs without a gap from every checkpoint to the end; exit 0 only if all is sound.
    Verify {
        #[command(flatten)]
        source: Source,
        /// One JSON object instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Restore a service's state from the archive alone into a fresh app: the newest
    /// archived checkpoint at or before the target, then the archived log replayed.
    Restore(ArchiveRestoreArgs),
}

/// Where the archive is and how to read it.
#[derive(Args)]
pub struct Source {
    /// The archive: `s3://bucket/prefix` or `file:///path`.
    #[arg(long = "from")]
    from: String,
    #[command(flatten)]
    access: Access,
}

/// How to read an archive besides its url.
#[derive(Args)]
pub struct Access {
    /// The archive's key file (`haven archive keygen`).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// An S3-compatible endpoint, e.g. http://127.0.0.1:8333 (AWS's own when absent).
    #[arg(long)]
    endpoint: Option<String>,
    /// Read an archive written with `encrypt = false` (no key).
    #[arg(long)]
    plaintext: bool,
}

impl Source {
    async fn reader(&self) -> anyhow::Result<Reader> {
        let (store, protection) = self.access.open(&self.from)?;
        Ok(Reader::open(store, protection).await?)
    }
}

impl Access {
    /// The store at `url` and the key to read it with.
    pub fn open(&self, url: &str) -> anyhow::Result<(Store, Protection)> {
        haven_archive::store::install_crypto_provider();
        let protection = match (&self.key_file, self.plaintext) {
            (Some(path), false) => Protection::Encrypted(ArchiveKey::load(path)?),
            (None, true) => Protection::Plaintext,
            (Some(_), true) => anyhow::bail!("--key-file and --plaintext exclude each other"),
            (None, false) => anyhow::bail!(
                "--key-file is required (or --plaintext for an archive written with encrypt = false)"
            ),
        };
        let store = Store::open(&StoreSettings {
            url: url.to_string(),
            endpoint: self.endpoint.clone(),
        })?;
        Ok((store, protection))
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_index", "to_time", "latest"])))]
#[command(group(clap::ArgGroup::new("app").required(true).args(["app_url", "config"])))]
pub struct ArchiveRestoreArgs {
    #[command(flatten)]
    source: Source,
    /// Restore the state as of this log index.
    #[arg(long)]
    to_index: Option<u64>,
    /// Restore the state as of this time (RFC 3339): the last entry stamped at or before it.
    #[arg(long)]
    to_time: Option<String>,
    /// Restore the newest state the archive holds.
    #[arg(long)]
    latest: bool,
    /// Where the app's state ends up; must be empty or absent.
    #[arg(long)]
    out: PathBuf,
    /// A fresh, empty instance of an app Haven does not run (checkpoints taken in hooks mode).
    #[arg(long)]
    app_url: Option<String>,
    /// A node config naming how to run the app (`[app] command`, checkpoint mode, limits):
    /// Haven starts a fresh replica with `--out` as its data directory.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The service in `--config`, when it has several.
    #[arg(long)]
    service: Option<String>,
    /// A command run against the restored app (exit 0 = good), with its URL in
    /// HAVEN_RESTORE_URL and the output directory in HAVEN_RESTORE_DIR.
    #[arg(long)]
    check: Option<String>,
    /// One JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: ArchiveCommand) -> anyhow::Result<(String, bool)> {
    match command {
        ArchiveCommand::Keygen => Ok((ArchiveKey::generate().to_file_text(), true)),
        ArchiveCommand::Ls { source, json } => {
            let reader = source.reader().await?;
            let catalog = reader.catalog();
            let text = match json {
                true => format!("{}\n", serde_json::to_string(&listing(catalog))?),
                false => table(catalog),
            };
            Ok((text, true))
        }
        ArchiveCommand::Verify { source, json } => {
            let reader = source.reader().await?;
            let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
            let check = |path: &std::path::Path| {
                format::verify(path).map(|_| ()).map_err(|e| e.to_string())
            };
            let found = reader::verify(&reader, scratch.path(), &check).await;
            let text = match json {
                true => format!("{}\n", serde_json::to_string(&found)?),
                false => verification(&reader.catalog().url, &found),
            };
            Ok((text, found.sound()))
        }
        ArchiveCommand::Restore(args) => restore_from_archive(args).await,
    }
}

async fn restore_from_archive(args: ArchiveRestoreArgs) -> anyhow::Result<(String, bool)> {
    let target = match (args.to_index, &args.to_time, args.latest) {
        (Some(index), _, _) => Target::Index(index),
        (None, Some(time), _) => Target::Time(parse_time(time)?),
        _ => Target::Latest,
    };
    let settings = app_settings(&args)?;
    let reader = args.source.reader().await?;
    let options = RestoreOptions {
        data_dir: PathBuf::new(),
        target,
        out: args.out.clone(),
        from_scratch: false,
        app_url: args.app_url.clone(),
        check: args.check.clone(),
    };
    let progress = Bar::default();
    let archive = ArchiveRestore { reader, settings };
    let report = restore::run_from_archive(archive, options, &progress).await;
    progress.finish();
    let report = report?;
    let good = report.check_passed != Some(false);
    if args.json {
        return Ok((format!("{}\n", serde_json::to_string(&report)?), good));
    }
    let verdict = match report.check_passed {
        Some(true) => {
            "restore GOOD: every object authenticated, the checkpoint verified, the log continuous, and the check passed"
        }
        Some(false) => "restore FAILED: the check command failed against the restored app",
        None => {
            "restore GOOD: every object authenticated, the checkpoint verified, the log continuous (no --check given)"
        }
    };
    Ok((format!("{}{verdict}\n", summary(&report)), good))
}

/// How to run the app: from a node's config, or an app Haven does not run.
fn app_settings(args: &ArchiveRestoreArgs) -> anyhow::Result<AppSettings> {
    if let Some(path) = &args.config {
        let (_, service) = service_in(path, args.service.as_deref())?;
        return Ok(AppSettings::from_config(&service));
    }
    let url = args.app_url.clone().context("give --app-url or --config")?;
    let limits = Limits::default();
    Ok(AppSettings {
        cluster: String::new(),
        url,
        command: None,
        env: Vec::new(),
        mode: Some("hooks".to_string()),
        snapshot_path: paths::SNAPSHOT.into(),
        restore_path: paths::RESTORE.into(),
        timeout_ms: 10_000,
        start_timeout_ms: 10_000,
        idempotency_keys_max: limits.idempotency_keys_max,
        idempotency_retention_s: limits.idempotency_retention_s,
        data_dir: None,
    })
}

/// A node's config and the service in it that `service` names (or its only one).
pub fn service_in(
    path: &std::path::Path,
    service: Option<&str>,
) -> anyhow::Result<(Config, haven_base::config::ServiceConfig)> {
    let config = Config::load(path)?;
    let found = match service {
        Some(name) => config
            .services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("{} has no service {name:?}", path.display()))?,
        None if config.services.len() == 1 => config.service(),
        None => anyhow::bail!(
            "{} has several services: name one with --service",
            path.display()
        ),
    };
    let found = found.clone();
    Ok((config, found))
}

#[derive(Serialize)]
struct Listing<'a> {
    url: &'a str,
    epochs: &'a [haven_archive::epoch::EpochMarker],
    checkpoints: &'a [haven_archive::catalog::CheckpointObject],
    log: &'a [haven_archive::catalog::LogObject],
    last_index: Option<u64>,
    last_time: Option<String>,
}

fn listing(catalog: &Catalog) -> Listing<'_> {
    let last = catalog.last_entry();
    Listing {
        url: &catalog.url,
        epochs: &catalog.epochs,
        checkpoints: &catalog.checkpoints,
        log: &catalog.log,
        last_index: last.map(|(index, _)| index),
        last_time: last.map(|(_, time)| rfc3339(time)),
    }
}

fn table(catalog: &Catalog) -> String {
    let mut out = format!("archive {}\n", catalog.url);
    for e in &catalog.epochs {
        out.push_str(&format!(
            "epoch {} of {}/{} from index {} (created {})\n",
            e.epoch,
            e.cluster,
            e.service,
            e.start_index,
            rfc3339(e.created_us)
        ));
    }
    out.push_str(&format!(
        "{:<12} {:>10} {:>10} {:<27} {:>10}\n",
        "KIND", "FIRST", "LAST", "TIME", "BYTES"
    ));
    for c in &catalog.checkpoints {
        out.push_str(&format!(
            "{:<12} {:>10} {:>10} {:<27} {:>10}\n",
            "checkpoint",
            c.index,
            c.index,
            rfc3339(c.time_us),
            c.size
        ));
    }
    for o in &catalog.log {
        out.push_str(&format!(
            "{:<12} {:>10} {:>10} {:<27} {:>10}\n",
            "log",
            o.first,
            o.last,
            rfc3339(o.time_us),
            o.size
        ));
    }
    match catalog.last_entry() {
        Some((index, time)) => out.push_str(&format!(
            "restorable up to index {index} ({})\n",
            rfc3339(time)
        )),
        None => out.push_str("(empty)\n"),
    }
    out
}

fn verification(url: &str, found: &Verification) -> String {
    let mut out = format!(
        "archive {url}: {} objects, {} bytes, {} entries, {} checkpoints; history {:?}..={:?}\n",
        found.objects,
        found.bytes,
        found.entries,
        found.checkpoints,
        found.first_index,
        found.last_index
    );
    for problem in &found.problems {
        out.push_str(&format!("PROBLEM {problem}\n"));
    }
    out.push_str(match found.sound() {
        true => "sound\n",
        false => "NOT SOUND\n",
    });
    out
}
