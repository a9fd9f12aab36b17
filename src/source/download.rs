//! A source given as an `http://` or `https://` URL, or as a release name
//! (`fedora:42/workstation/x86_64`, through [`super::releases`]): downloaded into a
//! cache directory, resumable across runs, verified, then written as a local file.
//!
//! The download goes to `NAME.part` and is renamed to `NAME` only when it is
//! complete and its sha256 matches the checksum: a file named `NAME` in the cache
//! is always a verified image. A dropped connection or a timeout leaves the
//! `.part` file, and the next run asks for the rest with a `Range` request. The
//! expected sha256 is fetched first (a few KiB): the CHECKSUM file beside the
//! image (its name is derived from Fedora's naming, or given with `--checksum`),
//! checked with [`super::signed_checksum`], or the release index's sha256 when no
//! CHECKSUM is published beside the image.
//!
//! One blocking HTTP client (ureq with rustls); TLS trusts the system's CA bundle
//! and `--ca-file`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::error::{Classify, ErrorKind};
use crate::progress::Progress;

use super::checksum::hex;
use super::releases::{self, ReleaseError};
use super::signed_checksum::{
    self, CheckedFile, ChecksumReport, Keyring, SignedChecksumError, SourceCheck, Trust,
};

/// Where system CA bundles live (Debian/Ubuntu, Fedora/RHEL, others).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Index files and CHECKSUMs are small; a server sending more is not serving one.
const MAX_SMALL_FILE: u64 = 16 << 20;

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("{url} is not a URL livestick can download: {why}")]
    BadUrl { url: String, why: String },
    #[error(
        "{url}: the server answered {status} {text} (not found); check the URL or release name"
    )]
    NotFound {
        url: String,
        status: u16,
        text: String,
    },
    #[error("{url}: the server answered {status} {text}; try again later or use another mirror")]
    Status {
        url: String,
        status: u16,
        text: String,
    },
    #[error(
        "{url} served an HTML page instead of {what} (a mirror's error or login page?); check the URL, or download the image another way"
    )]
    Html { url: String, what: String },
    #[error(
        "cannot reach {url}: {detail}; check the address and the network, and --ca-file for a private certificate authority"
    )]
    Connect { url: String, detail: String },
    #[error(
        "downloading {url} stopped after {have} of {total} bytes ({detail}); what arrived is kept in {part}: run the same command again to resume from there"
    )]
    Dropped {
        url: String,
        have: u64,
        total: String,
        detail: String,
        part: PathBuf,
    },
    #[error(
        "{url} was downloaded, but its sha256 {actual} is not {expected} from {checksum}: the download is corrupt (the partial file was removed); run the same command again to download it afresh"
    )]
    Corrupt {
        url: String,
        expected: String,
        actual: String,
        checksum: String,
    },
    #[error(
        "no checksum for {url}: there is no {tried} beside it; give one with --checksum URL|FILE, or pass --allow-unsigned to download and write it unchecked"
    )]
    NoChecksum { url: String, tried: String },
    #[error("the download directory {dir}: {source}; give a writable one with --download-dir")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the download to {path} failed: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the CA file {path}: {detail}; give --ca-file a PEM file of certificates")]
    CaFile { path: PathBuf, detail: String },
    #[error(transparent)]
    Checksum(#[from] SignedChecksumError),
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

impl Classify for DownloadError {
    fn kind(&self) -> ErrorKind {
        match self {
            DownloadError::BadUrl { .. }
            | DownloadError::NotFound { .. }
            | DownloadError::Html { .. }
            | DownloadError::Corrupt { .. }
            | DownloadError::NoChecksum { .. }
            | DownloadError::CaFile { .. }
            | DownloadError::Release(_) => ErrorKind::BadInput,
            DownloadError::Checksum(e) => e.kind(),
            DownloadError::Status { .. }
            | DownloadError::Connect { .. }
            | DownloadError::Dropped { .. }
            | DownloadError::Dir { .. }
            | DownloadError::Write { .. } => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            DownloadError::Status { .. }
            | DownloadError::Connect { .. }
            | DownloadError::Dropped { .. } => {
                "nothing was written to any target; what was downloaded is kept — run the same command again to resume"
            }
            DownloadError::Checksum(e) => e.hint(),
            _ => self.kind().hint(),
        }
    }
}

/// The user's choices for a remote source.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// `--download-dir`, else `$XDG_CACHE_HOME/livestick` or `~/.cache/livestick`.
    pub dir: Option<PathBuf>,
    /// `--checksum URL|FILE`.
    pub checksum: Option<String>,
    pub keyring: Option<PathBuf>,
    pub allow_unsigned: bool,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// Connect and per-read timeout.
    pub timeout: Duration,
    pub releases_url: String,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            dir: None,
            checksum: None,
            keyring: None,
            allow_unsigned: false,
            ca_file: None,
            timeout: Duration::from_secs(30),
            releases_url: releases::DEFAULT_RELEASES_URL.to_string(),
        }
    }
}

/// A verified image in the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    pub url: String,
    pub check: SourceCheck,
    /// False when the cache already held the verified file.
    pub downloaded: bool,
}

/// Whether a source argument names something to download.
pub fn is_remote(source: &str) -> bool {
    source.starts_with("http://")
        || source.starts_with("https://")
        || releases::is_release_name(source)
}

/// The default cache directory.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("livestick"))
}

/// Downloads (or finds in the cache) and verifies the image `source` names.
pub fn fetch(
    source: &str,
    opts: &DownloadOptions,
    progress: &Progress,
) -> Result<Fetched, DownloadError> {
    let client = Client::new(opts)?;
    let (url, release_sha) = if releases::is_release_name(source) {
        let spec = releases::parse_spec(source)?;
        let index = client.get_small(&opts.releases_url, "the release index")?;
        let release =
            releases::resolve(&opts.releases_url, &String::from_utf8_lossy(&index), &spec)?;
        progress.note(&format!("{spec} is {}", release.link));
        (release.link, release.sha256)
    } else {
        (source.to_string(), None)
    };
    let name = file_name(&url)?;
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => default_dir().ok_or_else(|| DownloadError::Dir {
            dir: PathBuf::from("~/.cache/livestick"),
            source: io::Error::other("neither XDG_CACHE_HOME nor HOME is set"),
        })?,
    };
    std::fs::create_dir_all(&dir).map_err(|source| DownloadError::Dir {
        dir: dir.clone(),
        source,
    })?;
    let expected = expected_checksum(&client, &url, &name, release_sha, opts)?;
    let done = dir.join(&name);
    let part = dir.join(format!("{name}.part"));
    let mut report = match expected {
        Ok(report) => report,
        Err(why) => {
            // --allow-unsigned with nothing to compare with: downloaded as it
            // comes, and the report says that nothing was checked.
            if !done.is_file() {
                client.download_to(&url, &part, progress)?;
                std::fs::rename(&part, &done).map_err(|source| DownloadError::Write {
                    path: done.clone(),
                    source,
                })?;
            }
            return Ok(Fetched {
                path: done,
                url,
                check: SourceCheck::NotChecked { why },
                downloaded: true,
            });
        }
    };

    if done.is_file() {
        // A name in the cache is a verified file, but the checksum may have
        // changed (a respin) or the file been damaged since: checked again.
        let mut again = report.clone();
        if signed_checksum::verify_image(&done, &mut again, progress).is_ok() {
            return Ok(Fetched {
                path: done,
                url,
                check: SourceCheck::Checked(again),
                downloaded: false,
            });
        }
        std::fs::remove_file(&done).map_err(|source| DownloadError::Write {
            path: done.clone(),
            source,
        })?;
    }
    let digest = client.download_to(&url, &part, progress)?;
    let actual = hex(&digest);
    report.actual_sha256 = Some(actual.clone());
    report.matched = Some(actual == report.expected_sha256);
    if report.matched != Some(true) {
        // Resuming would keep the bad bytes: the next run starts afresh.
        let _ = std::fs::remove_file(&part);
        return Err(DownloadError::Corrupt {
            url,
            expected: report.expected_sha256,
            actual,
            checksum: report.file,
        });
    }
    std::fs::rename(&part, &done).map_err(|source| DownloadError::Write {
        path: done.clone(),
        source,
    })?;
    Ok(Fetched {
        path: done,
        url,
        check: SourceCheck::Checked(report),
        downloaded: true,
    })
}

/// The one entry for a write: a URL or release name is fetched into the cache
/// and verified; a local image is checked against `--checksum` or a CHECKSUM
/// beside it, its bytes read only when `read_local` (a dry run checks the
/// signature and the name, not the image). Returns the local path and the check.
pub fn prepare(
    source: &Path,
    opts: &DownloadOptions,
    read_local: bool,
    progress: &Progress,
) -> Result<(PathBuf, SourceCheck), DownloadError> {
    let text = source.to_string_lossy();
    if is_remote(&text) {
        let fetched = fetch(&text, opts, progress)?;
        return Ok((fetched.path, fetched.check));
    }
    let mut check = match &opts.checksum {
        Some(location) if location.starts_with("http://") || location.starts_with("https://") => {
            let name = source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (origin, bytes) = fetch_checksum_text(location, opts)?;
            let keyring = Keyring::load(opts.keyring.as_deref())?;
            let checked =
                signed_checksum::check_bytes(&origin, &bytes, &keyring, opts.allow_unsigned)?;
            let expected = checked.expected(&name)?;
            SourceCheck::Checked(ChecksumReport::new(&checked, &name, &expected, false))
        }
        given => signed_checksum::plan_local(
            source,
            &signed_checksum::CheckOptions {
                checksum: given.as_ref().map(PathBuf::from),
                keyring: opts.keyring.clone(),
                allow_unsigned: opts.allow_unsigned,
            },
        )?,
    };
    if read_local && let SourceCheck::Checked(report) = &mut check {
        signed_checksum::verify_image(source, report, progress)?;
    }
    Ok((source.to_path_buf(), check))
}

/// Reads `--checksum`'s file or URL's text for a local source too.
pub fn fetch_checksum_text(
    location: &str,
    opts: &DownloadOptions,
) -> Result<(String, Vec<u8>), DownloadError> {
    if location.starts_with("http://") || location.starts_with("https://") {
        let client = Client::new(opts)?;
        Ok((
            location.to_string(),
            client.get_small(location, "a CHECKSUM file")?,
        ))
    } else {
        let bytes = std::fs::read(location).map_err(|source| {
            DownloadError::Checksum(SignedChecksumError::ReadChecksum {
                file: location.to_string(),
                source,
            })
        })?;
        Ok((location.to_string(), bytes))
    }
}

/// The expected sha256 of the image: `--checksum`, else the CHECKSUM beside it,
/// else the release index's value; with none, only `--allow-unsigned` goes on
/// (`Ok(Err(why))`).
fn expected_checksum(
    client: &Client,
    url: &str,
    name: &str,
    release_sha: Option<String>,
    opts: &DownloadOptions,
) -> Result<Result<ChecksumReport, String>, DownloadError> {
    let keyring = || Keyring::load(opts.keyring.as_deref());
    let from = |checked: CheckedFile| -> Result<ChecksumReport, DownloadError> {
        let expected = checked.expected(name)?;
        Ok(ChecksumReport::new(&checked, name, &expected, false))
    };
    if let Some(location) = &opts.checksum {
        let (origin, bytes) = if location.starts_with("http://") || location.starts_with("https://")
        {
            (
                location.clone(),
                client.get_small(location, "a CHECKSUM file")?,
            )
        } else {
            fetch_checksum_text(location, opts)?
        };
        let checked =
            signed_checksum::check_bytes(&origin, &bytes, &keyring()?, opts.allow_unsigned)?;
        return from(checked).map(Ok);
    }
    let base = &url[..url.rfind('/').map_or(url.len(), |i| i + 1)];
    let mut tried = Vec::new();
    if let Some(checksum_name) = fedora_checksum_name(name) {
        let checksum_url = format!("{base}{checksum_name}");
        match client.get_small(&checksum_url, "a CHECKSUM file") {
            Ok(bytes) => {
                let checked = signed_checksum::check_bytes(
                    &checksum_url,
                    &bytes,
                    &keyring()?,
                    opts.allow_unsigned,
                )?;
                let mut report = from(checked)?;
                report.discovered = true;
                return Ok(Ok(report));
            }
            Err(DownloadError::NotFound { .. }) => tried.push(checksum_url),
            Err(e) => return Err(e),
        }
    }
    if let Some(sha) = release_sha.filter(|s| s.len() == 64) {
        let checked = CheckedFile {
            origin: opts.releases_url.clone(),
            trust: Trust::ReleaseIndex {
                url: opts.releases_url.clone(),
            },
            entries: signed_checksum::parse_entries(&format!("{sha}  {name}")),
        };
        return from(checked).map(Ok);
    }
    // A missing image is the better answer than a missing CHECKSUM beside it.
    client.head(url)?;
    let tried_text = if tried.is_empty() {
        "CHECKSUM file (its name cannot be derived from this file name)".to_string()
    } else {
        tried.join(", ")
    };
    if opts.allow_unsigned {
        return Ok(Err(format!(
            "no {tried_text} beside {url}; downloaded unchecked because of --allow-unsigned"
        )));
    }
    Err(DownloadError::NoChecksum {
        url: url.to_string(),
        tried: tried_text,
    })
}

/// The last path segment of a URL, the name the image gets in the cache.
pub fn file_name(url: &str) -> Result<String, DownloadError> {
    let bad = |why: &str| DownloadError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("only http:// and https:// URLs are downloaded"))?;
    let path = rest.split(['?', '#']).next().unwrap_or("");
    let (_, path) = path
        .split_once('/')
        .ok_or_else(|| bad("it names no file"))?;
    let name = path.rsplit('/').next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." || name.contains('%') || name.starts_with('.')
    {
        return Err(bad("its last part is not a plain file name"));
    }
    Ok(name.to_string())
}

/// Fedora publishes `Fedora-Workstation-42-1.1-x86_64-CHECKSUM` beside
/// `Fedora-Workstation-Live-42-1.1.x86_64.iso` (and beside the older
/// `Fedora-Workstation-Live-x86_64-40-1.14.iso`, `Fedora-Server-dvd-x86_64-42-1.1.iso`):
/// product, version-release, arch, with `Live`, `dvd`, `netinst` dropped.
pub fn fedora_checksum_name(image: &str) -> Option<String> {
    const ARCHES: &[&str] = &["x86_64", "aarch64", "ppc64le", "s390x"];
    let stem = image
        .strip_suffix(".iso")
        .or_else(|| image.strip_suffix(".raw.xz"))
        .or_else(|| image.strip_suffix(".qcow2"))?;
    let arch = ARCHES.iter().find(|a| stem.contains(*a))?;
    let without = stem
        .replacen(&format!(".{arch}"), "", 1)
        .replacen(&format!("-{arch}"), "", 1);
    let tokens: Vec<&str> = without
        .split('-')
        .filter(|t| !matches!(*t, "Live" | "dvd" | "netinst" | "Disk" | "boot"))
        .collect();
    let first_digit = tokens
        .iter()
        .position(|t| t.starts_with(|c: char| c.is_ascii_digit()))?;
    if first_digit == 0 || first_digit == tokens.len() {
        return None;
    }
    Some(format!(
        "{}-{}-{arch}-CHECKSUM",
        tokens[..first_digit].join("-"),
        tokens[first_digit..].join("-")
    ))
}

struct Client {
    agent: ureq::Agent,
}

impl Client {
    fn new(opts: &DownloadOptions) -> Result<Client, DownloadError> {
        let tls = tls_config(opts.ca_file.as_deref())?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(opts.timeout)
            .timeout_read(opts.timeout)
            .timeout_write(opts.timeout)
            .user_agent(concat!("livestick/", env!("CARGO_PKG_VERSION")))
            .tls_config(Arc::new(tls))
            .build();
        Ok(Client { agent })
    }

    /// Whether `url` is there (a HEAD request), as an error when it is not.
    fn head(&self, url: &str) -> Result<(), DownloadError> {
        self.send(url, self.agent.head(url)).map(drop)
    }

    fn call(&self, url: &str, range_from: u64) -> Result<ureq::Response, DownloadError> {
        let mut request = self.agent.get(url);
        if range_from > 0 {
            request = request.set("Range", &format!("bytes={range_from}-"));
        }
        self.send(url, request)
    }

    fn send(&self, url: &str, request: ureq::Request) -> Result<ureq::Response, DownloadError> {
        match request.call() {
            Ok(response) => Ok(response),
            // 416: the partial file already holds every byte (or more); the
            // caller decides.
            Err(ureq::Error::Status(416, response)) => Ok(response),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.status_text().to_string();
                if status == 404 || status == 410 {
                    Err(DownloadError::NotFound {
                        url: url.to_string(),
                        status,
                        text,
                    })
                } else {
                    Err(DownloadError::Status {
                        url: url.to_string(),
                        status,
                        text,
                    })
                }
            }
            Err(ureq::Error::Transport(t)) => Err(DownloadError::Connect {
                url: url.to_string(),
                detail: t.to_string(),
            }),
        }
    }

    /// A small text file (index, CHECKSUM), refused when HTML.
    fn get_small(&self, url: &str, what: &str) -> Result<Vec<u8>, DownloadError> {
        let response = self.call(url, 0)?;
        if is_html_type(response.header("Content-Type")) {
            return Err(DownloadError::Html {
                url: url.to_string(),
                what: what.to_string(),
            });
        }
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_SMALL_FILE)
            .read_to_end(&mut bytes)
            .map_err(|e| DownloadError::Connect {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        if looks_like_html(&bytes) {
            return Err(DownloadError::Html {
                url: url.to_string(),
                what: what.to_string(),
            });
        }
        Ok(bytes)
    }

    /// Downloads `url` into `part`, resuming from what `part` holds; returns the
    /// sha256 of the whole file.
    fn download_to(
        &self,
        url: &str,
        part: &Path,
        progress: &Progress,
    ) -> Result<[u8; 32], DownloadError> {
        let write_error = |source| DownloadError::Write {
            path: part.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(part)
            .map_err(write_error)?;
        let mut have = file.seek(SeekFrom::End(0)).map_err(write_error)?;
        let response = self.call(url, have)?;
        let status = response.status();
        let mut total = response
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        match status {
            206 => {
                let start = response
                    .header("Content-Range")
                    .and_then(content_range_start);
                if start != Some(have) {
                    return Err(DownloadError::Status {
                        url: url.to_string(),
                        status,
                        text: format!(
                            "with a range that does not start at byte {have} (Content-Range {:?})",
                            response.header("Content-Range")
                        ),
                    });
                }
                total = total.map(|t| t + have);
            }
            416 => {
                // The server has nothing past `have`: either the part is
                // complete, or it is longer than the file now is. The checksum
                // decides; a longer one is restarted.
                let size = response
                    .header("Content-Range")
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if size == Some(have) {
                    return hash_file(&mut file).map_err(write_error);
                }
                file.set_len(0).map_err(write_error)?;
                drop(file);
                return self.download_to(url, part, progress);
            }
            _ => {
                // 200: the whole file (the server ignored the Range).
                if have > 0 {
                    file.set_len(0).map_err(write_error)?;
                    file.seek(SeekFrom::Start(0)).map_err(write_error)?;
                    have = 0;
                }
            }
        }
        if is_html_type(response.header("Content-Type")) {
            return Err(DownloadError::Html {
                url: url.to_string(),
                what: "the image".into(),
            });
        }
        let mut hasher = Sha256::new();
        if have > 0 {
            file.seek(SeekFrom::Start(0)).map_err(write_error)?;
            let mut existing = (&mut file).take(have);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = existing.read(&mut buf).map_err(write_error)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            file.seek(SeekFrom::Start(have)).map_err(write_error)?;
        }
        progress.phase("download", total.unwrap_or(0));
        progress.inc(have);
        let mut reader = response.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut first = have == 0;
        let dropped = |have: u64, detail: String| DownloadError::Dropped {
            url: url.to_string(),
            have,
            total: total.map_or_else(|| "?".to_string(), |t| t.to_string()),
            detail,
            part: part.to_path_buf(),
        };
        loop {
            let n = match reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    file.sync_data().map_err(write_error)?;
                    let detail = match e.kind() {
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                            "no data for the read timeout (--download-timeout)".to_string()
                        }
                        _ => e.to_string(),
                    };
                    return Err(dropped(have, detail));
                }
            };
            if n == 0 {
                break;
            }
            if first {
                first = false;
                if looks_like_html(&buf[..n]) {
                    drop(file);
                    let _ = std::fs::remove_file(part);
                    return Err(DownloadError::Html {
                        url: url.to_string(),
                        what: "the image".into(),
                    });
                }
            }
            file.write_all(&buf[..n]).map_err(write_error)?;
            hasher.update(&buf[..n]);
            have += n as u64;
            progress.inc(n as u64);
        }
        file.sync_data().map_err(write_error)?;
        if let Some(total) = total
            && have < total
        {
            return Err(dropped(have, "the connection closed early".into()));
        }
        Ok(hasher.finalize().into())
    }
}

fn hash_file(file: &mut File) -> io::Result<[u8; 32]> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    io::copy(file, &mut hasher)?;
    Ok(hasher.finalize().into())
}

fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn is_html_type(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| {
        let t = t.trim().to_ascii_lowercase();
        t.starts_with("text/html") || t.starts_with("application/xhtml")
    })
}

/// An error page served with a generic type still starts like HTML; an ISO, a
/// compressed or raw image never does.
fn looks_like_html(head: &[u8]) -> bool {
    let head: Vec<u8> = head
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take(15)
        .map(u8::to_ascii_lowercase)
        .collect();
    head.starts_with(b"<!doctype html") || head.starts_with(b"<html") || head.starts_with(b"<?xml")
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, DownloadError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let env_bundle = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let system = env_bundle
        .into_iter()
        .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    if let Some(bundle) = system
        && let Ok(certs) = CertificateDer::pem_file_iter(&bundle)
    {
        roots.add_parsable_certificates(certs.flatten());
    }
    if let Some(path) = ca_file {
        let ca_error = |detail: String| DownloadError::CaFile {
            path: path.to_path_buf(),
            detail,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_error(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("it holds no certificate".into()));
        }
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(ca_error("none of its certificates is usable".into()));
        }
    }
    // ring builds with the C compiler alone (aws-lc-rs needs cmake); without its
    // post-quantum key exchange the transport is still TLS 1.3, and the image is
    // verified by its signed checksum, not by the transport.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DownloadError::CaFile {
            path: PathBuf::from("(TLS setup)"),
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_fedora_checksum_names() {
        for (iso, sum) in [
            (
                "Fedora-Workstation-Live-42-1.1.x86_64.iso",
                "Fedora-Workstation-42-1.1-x86_64-CHECKSUM",
            ),
            (
                "Fedora-Workstation-Live-x86_64-40-1.14.iso",
                "Fedora-Workstation-40-1.14-x86_64-CHECKSUM",
            ),
            (
                "Fedora-Server-dvd-x86_64-42-1.1.iso",
                "Fedora-Server-42-1.1-x86_64-CHECKSUM",
            ),
            (
                "Fedora-KDE-Desktop-Live-42-1.1.x86_64.iso",
                "Fedora-KDE-Desktop-42-1.1-x86_64-CHECKSUM",
            ),
        ] {
            assert_eq!(fedora_checksum_name(iso).as_deref(), Some(sum), "{iso}");
        }
        assert_eq!(fedora_checksum_name("debian.iso"), None);
    }

    #[test]
    fn file_names_from_urls() {
        assert_eq!(file_name("https://h/a/b/x.iso?mirror=1").unwrap(), "x.iso");
        assert!(file_name("https://h/a/").is_err());
        assert!(file_name("https://h").is_err());
        assert!(file_name("ftp://h/x.iso").is_err());
        assert!(file_name("http://h/..").is_err());
    }

    #[test]
    fn html_is_recognised() {
        assert!(looks_like_html(b"\n <!DOCTYPE HTML><html>"));
        assert!(looks_like_html(b"<html><body>"));
        assert!(!looks_like_html(b"\0\0\0\0CD001"));
        assert!(is_html_type(Some("text/html; charset=utf-8")));
        assert!(!is_html_type(Some("application/octet-stream")));
    }
}
