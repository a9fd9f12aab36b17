//! Published checksum files: Fedora's `*-CHECKSUM` (`SHA256 (name) = hex` lines,
//! OpenPGP clearsigned) and the plain `sha256sum` format (`hex  name`).
//!
//! A checksum file is only as good as whoever signed it: the hash lines are read
//! from the signed text alone (lines outside the signature are ignored), the
//! signature is checked against a keyring (`--keyring`, or Fedora's keys where the
//! system keeps them), and an unsigned file, or a signed one with no key to check
//! it, is used only when the user says so (`allow_unsigned`). Everything here
//! happens before a target is opened: a bad signature, a missing name or a
//! mismatch is bad input, and the stick is left as it was.
//!
//! For a source streamed to the stick (a raw image), [`expected_sha256`] gives the
//! verified expected hash of one named image, to compare with at the end of the
//! stream.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use pgp::composed::{CleartextSignedMessage, Deserializable, SignedPublicKey};
use pgp::types::KeyDetails;
use serde::Serialize;
use thiserror::Error;

use crate::error::{Classify, ErrorKind};
use crate::progress::Progress;

use super::checksum::hex;

/// Where Fedora's signing keys live when the system has them: the release's own
/// keys (`fedora-gpg-keys`) and the `distribution-gpg-keys` package.
pub const DEFAULT_KEYRINGS: &[&str] = &[
    "/etc/pki/rpm-gpg",
    "/usr/share/distribution-gpg-keys/fedora",
];

/// A CHECKSUM file is a few KiB; anything much larger is not one.
const MAX_CHECKSUM_LEN: u64 = 4 << 20;

const SIGNED_HEADER: &str = "-----BEGIN PGP SIGNED MESSAGE-----";

#[derive(Debug, Error)]
pub enum SignedChecksumError {
    #[error("cannot read the checksum file {file}: {source}")]
    ReadChecksum {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{file} is not a checksum file: it is larger than {MAX_CHECKSUM_LEN} bytes or not text; give the image's CHECKSUM (or SHA256SUMS) file to --checksum"
    )]
    NotText { file: String },
    #[error(
        "{file} has no checksum lines (`SHA256 (NAME) = HEX` or `HEX  NAME`); give the image's CHECKSUM file to --checksum"
    )]
    NoEntries { file: String },
    #[error(
        "the OpenPGP signature block of {file} cannot be read ({detail}); download the CHECKSUM file again"
    )]
    BadArmor { file: String, detail: String },
    #[error(
        "{file} is not signed, so nothing says who made it; use the signed CHECKSUM the distribution publishes, or pass --allow-unsigned to trust this file as it is"
    )]
    Unsigned { file: String },
    #[error(
        "{file} is signed (key {key_ids}), but there is no key to check the signature with: looked in {looked}; install Fedora's keys (the distribution-gpg-keys package) or give the signer's public key with --keyring FILE|DIR (or pass --allow-unsigned to use the file without checking its signature)"
    )]
    NoKeyring {
        file: String,
        key_ids: String,
        looked: String,
    },
    #[error(
        "cannot read the keyring {path}: {detail}; give --keyring an OpenPGP public key file (armored or binary) or a directory of them"
    )]
    Keyring { path: PathBuf, detail: String },
    #[error(
        "the signature of {file} does not verify with any unrevoked key in {keyring} (signed by key {key_ids}): either the file was altered after it was signed or it is signed by a key you have not given; download the CHECKSUM again, or give the right key with --keyring"
    )]
    BadSignature {
        file: String,
        key_ids: String,
        keyring: String,
    },
    #[error(
        "the signature of {file} was made by {signer}, whose key expired on {expired}: an expired key vouches for nothing new, as a revoked one; get the current CHECKSUM and the distribution's current key (--keyring)"
    )]
    ExpiredKey {
        file: String,
        signer: String,
        /// RFC 3339, UTC.
        expired: String,
    },
    #[error(
        "{file} has no checksum for {name} (it lists {listed}); give the CHECKSUM file of this image (--checksum), or check the image's name"
    )]
    NameMissing {
        file: String,
        name: String,
        listed: String,
    },
    #[error(
        "{image} does not match its checksum in {file}: expected sha256 {expected}, the image has {actual}; the image is corrupt or not the one the CHECKSUM describes — download it again"
    )]
    Mismatch {
        image: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("reading {path} to check its sha256 failed: {source}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Classify for SignedChecksumError {
    fn kind(&self) -> ErrorKind {
        match self {
            SignedChecksumError::ReadImage { .. } => ErrorKind::Io,
            _ => ErrorKind::BadInput,
        }
    }
}

/// The signer of a good signature, as a person checks it against the
/// distribution's published key list.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Signer {
    /// The 16-hex-digit key id of the key that made the signature (a subkey's, if
    /// a subkey signed).
    pub key_id: String,
    /// The primary key's fingerprint.
    pub fingerprint: String,
    /// The primary key's first user id, e.g. `Fedora (42) <fedora-42-primary@fedoraproject.org>`.
    pub user_id: Option<String>,
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user_id {
            Some(uid) => write!(f, "{uid}, key {}", self.fingerprint),
            None => write!(f, "key {}", self.fingerprint),
        }
    }
}

/// Public keys to check signatures with, and where they came from.
#[derive(Debug, Default)]
pub struct Keyring {
    keys: Vec<SignedPublicKey>,
    pub sources: Vec<PathBuf>,
}

impl Keyring {
    /// `--keyring FILE|DIR`: every key in the file, or in every file of the
    /// directory (files that hold no key, like a README, are passed over). Without
    /// a path, Fedora's key directories that exist on this system; none is not an
    /// error until a signature needs checking.
    pub fn load(path: Option<&Path>) -> Result<Keyring, SignedChecksumError> {
        let mut ring = Keyring::default();
        match path {
            Some(path) => {
                ring.add_path(path, true)?;
                if ring.keys.is_empty() {
                    return Err(SignedChecksumError::Keyring {
                        path: path.to_path_buf(),
                        detail: "it holds no OpenPGP public key".into(),
                    });
                }
            }
            None => {
                for dir in DEFAULT_KEYRINGS {
                    let dir = Path::new(dir);
                    if dir.is_dir() {
                        // A system directory with one unreadable file must not stop
                        // the others from being used.
                        let _ = ring.add_path(dir, false);
                    }
                }
            }
        }
        Ok(ring)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn describe(&self) -> String {
        if self.sources.is_empty() {
            DEFAULT_KEYRINGS.join(", ")
        } else {
            self.sources
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    fn add_path(&mut self, path: &Path, strict: bool) -> Result<(), SignedChecksumError> {
        let keyring_error = |detail: String| SignedChecksumError::Keyring {
            path: path.to_path_buf(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|e| keyring_error(e.to_string()))?;
        if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| keyring_error(e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for file in files {
                // In a directory, a file that is not a key is someone else's.
                let _ = self.add_file(&file);
            }
            self.sources.push(path.to_path_buf());
            Ok(())
        } else {
            match self.add_file(path) {
                Ok(()) => {
                    self.sources.push(path.to_path_buf());
                    Ok(())
                }
                Err(e) if strict => Err(e),
                Err(_) => Ok(()),
            }
        }
    }

    fn add_file(&mut self, path: &Path) -> Result<(), SignedChecksumError> {
        let keyring_error = |detail: String| SignedChecksumError::Keyring {
            path: path.to_path_buf(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(|e| keyring_error(e.to_string()))?;
        let mut found = 0usize;
        // An armored file may hold several key blocks one after another (a
        // keyring exported with `gpg --export --armor A B`).
        let text = std::str::from_utf8(&bytes).ok();
        if let Some(text) = text.filter(|t| t.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----")) {
            for block in text.split_inclusive("-----END PGP PUBLIC KEY BLOCK-----") {
                let Some(start) = block.find("-----BEGIN PGP PUBLIC KEY BLOCK-----") else {
                    continue;
                };
                let (keys, _) = SignedPublicKey::from_armor_many(&block.as_bytes()[start..])
                    .map_err(|e| keyring_error(e.to_string()))?;
                for key in keys.flatten() {
                    self.keys.push(key);
                    found += 1;
                }
            }
        } else {
            let keys = SignedPublicKey::from_bytes_many(&bytes[..])
                .map_err(|e| keyring_error(e.to_string()))?;
            for key in keys.flatten() {
                self.keys.push(key);
                found += 1;
            }
        }
        if found == 0 {
            return Err(keyring_error("it holds no OpenPGP public key".into()));
        }
        Ok(())
    }

    /// The key (primary or subkey) that made one of `msg`'s signatures and is
    /// valid now; failing that, a key that made one but has expired.
    fn signer_of(&self, msg: &CleartextSignedMessage) -> SignerFound {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut expired = None;
        // A key its owner revoked signs nothing any more (Fedora revokes keys of
        // releases whose signing was compromised).
        let live_keys = self.keys.iter().filter(|k| {
            !k.details
                .revocation_signatures
                .iter()
                .any(|sig| sig.verify_key(&k.primary_key).is_ok())
        });
        for key in live_keys {
            let signer = |key_id: String| Signer {
                key_id,
                fingerprint: format!("{:X}", key.fingerprint()),
                user_id: key
                    .details
                    .users
                    .first()
                    .map(|u| String::from_utf8_lossy(u.id.id()).into_owned()),
            };
            let primary_expiry = primary_expiry(key);
            let mut found = |key_id: String, expiry: Option<u64>| match expiry {
                Some(at) if at <= now => {
                    expired.get_or_insert((signer(key_id), at));
                    None
                }
                _ => Some(signer(key_id)),
            };
            if msg.verify(key).is_ok()
                && let Some(good) = found(
                    hex(key.legacy_key_id().as_ref()).to_uppercase(),
                    primary_expiry,
                )
            {
                return SignerFound::Valid(good);
            }
            for sub in &key.public_subkeys {
                // A subkey counts only when its owner bound it to the primary key,
                // and lives no longer than the primary key.
                if sub.verify_bindings(&key.primary_key).is_ok()
                    && msg.verify(sub).is_ok()
                    && let Some(good) = found(
                        hex(sub.key.legacy_key_id().as_ref()).to_uppercase(),
                        earliest(primary_expiry, subkey_expiry(key, sub)),
                    )
                {
                    return SignerFound::Valid(good);
                }
            }
        }
        match expired {
            Some((signer, at)) => SignerFound::Expired(signer, at),
            None => SignerFound::Nobody,
        }
    }
}

/// What [`Keyring::signer_of`] found.
enum SignerFound {
    Valid(Signer),
    /// A key that made the signature but expired at this time (seconds since the
    /// epoch).
    Expired(Signer, u64),
    Nobody,
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When a validity period of `validity` counted from `created` ends; `None` for
/// no expiry (absent, or zero, which OpenPGP says means the same).
fn expiry_after(created: u32, validity: Option<pgp::types::Duration>) -> Option<u64> {
    let secs = std::time::Duration::from(validity?).as_secs();
    (secs > 0).then(|| u64::from(created) + secs)
}

/// When the primary key expires, by its newest self-signature that verifies
/// (a user id's certification or a direct-key signature): a key's owner extends
/// or shortens its life by signing it again, so an older signature's period no
/// longer counts, and a forged one is ignored.
fn primary_expiry(key: &SignedPublicKey) -> Option<u64> {
    let primary = &key.primary_key;
    let certifications = key.details.users.iter().flat_map(|user| {
        user.signatures.iter().filter(|sig| {
            sig.verify_certification(primary, pgp::types::Tag::UserId, &user.id)
                .is_ok()
        })
    });
    let direct = key
        .details
        .direct_signatures
        .iter()
        .filter(|sig| sig.verify_key(primary).is_ok());
    let newest = certifications
        .chain(direct)
        .max_by_key(|sig| sig.created().map(|t| t.as_secs()).unwrap_or(0))?;
    expiry_after(primary.created_at().as_secs(), newest.key_expiration_time())
}

/// When a subkey expires, by its newest binding signature that verifies.
fn subkey_expiry(key: &SignedPublicKey, sub: &pgp::composed::SignedPublicSubKey) -> Option<u64> {
    let newest = sub
        .signatures
        .iter()
        .filter(|sig| {
            sig.verify_subkey_binding(&key.primary_key, &sub.key)
                .is_ok()
        })
        .max_by_key(|sig| sig.created().map(|t| t.as_secs()).unwrap_or(0))?;
    expiry_after(sub.key.created_at().as_secs(), newest.key_expiration_time())
}

/// One `name → sha256` line of a checksum file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub sha256: [u8; 32],
}

/// A checksum file whose signature has been checked (or whose lack of one the
/// user accepted): its lines can be trusted as far as [`Trust`] says.
#[derive(Debug, Clone)]
pub struct CheckedFile {
    /// The path or URL it was read from.
    pub origin: String,
    pub trust: Trust,
    pub entries: Vec<Entry>,
}

/// How far a checksum file is trusted.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Trust {
    /// A good signature by a key of the keyring.
    Signed { signer: Signer, keyring: String },
    /// No signature, used because of `--allow-unsigned`.
    Unsigned,
    /// Signed, but no key on this system to check it; used because of
    /// `--allow-unsigned`.
    SignatureNotChecked { key_ids: String },
    /// The sha256 came from a release index (`releases.json`) fetched over
    /// the network, as Fedora Media Writer trusts it.
    ReleaseIndex { url: String },
}

impl Trust {
    pub fn describe(&self) -> String {
        match self {
            Trust::Signed { signer, .. } => format!("signed by {signer}"),
            Trust::Unsigned => "not signed (accepted with --allow-unsigned)".into(),
            Trust::SignatureNotChecked { key_ids } => format!(
                "signed by key {key_ids}, signature NOT checked: no key for it (accepted with --allow-unsigned)"
            ),
            Trust::ReleaseIndex { url } => {
                format!("from the release index {url} (not signed)")
            }
        }
    }
}

impl CheckedFile {
    /// The expected sha256 of the image called `name` (a file name, compared
    /// with the names in the file without their directories).
    pub fn expected(&self, name: &str) -> Result<[u8; 32], SignedChecksumError> {
        self.entries
            .iter()
            .find(|e| e.name == name || e.name.rsplit('/').next() == Some(name))
            .map(|e| e.sha256)
            .ok_or_else(|| SignedChecksumError::NameMissing {
                file: self.origin.clone(),
                name: name.to_string(),
                listed: listed(&self.entries),
            })
    }
}

fn listed(entries: &[Entry]) -> String {
    let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).take(5).collect();
    if entries.len() > 5 {
        names.push("…");
    }
    names.join(", ")
}

/// Reads a checksum file from disk (see [`check_text`]).
pub fn read_file(
    path: &Path,
    keyring: &Keyring,
    allow_unsigned: bool,
) -> Result<CheckedFile, SignedChecksumError> {
    let origin = path.display().to_string();
    let file = File::open(path).map_err(|source| SignedChecksumError::ReadChecksum {
        file: origin.clone(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_CHECKSUM_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SignedChecksumError::ReadChecksum {
            file: origin.clone(),
            source,
        })?;
    check_bytes(&origin, &bytes, keyring, allow_unsigned)
}

/// Checks a checksum file's bytes: the signature against `keyring`, then its lines.
pub fn check_bytes(
    origin: &str,
    bytes: &[u8],
    keyring: &Keyring,
    allow_unsigned: bool,
) -> Result<CheckedFile, SignedChecksumError> {
    let not_text = || SignedChecksumError::NotText {
        file: origin.to_string(),
    };
    if bytes.len() as u64 > MAX_CHECKSUM_LEN {
        return Err(not_text());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| not_text())?;
    check_text(origin, text, keyring, allow_unsigned)
}

/// Checks a checksum file's text. A clearsigned file's lines are taken from the
/// signed text only, after the signature verified.
pub fn check_text(
    origin: &str,
    text: &str,
    keyring: &Keyring,
    allow_unsigned: bool,
) -> Result<CheckedFile, SignedChecksumError> {
    let file = origin.to_string();
    let (trust, body) = match text.find(SIGNED_HEADER) {
        Some(start) => {
            let (msg, _) = CleartextSignedMessage::from_string(&text[start..]).map_err(|e| {
                SignedChecksumError::BadArmor {
                    file: file.clone(),
                    detail: e.to_string(),
                }
            })?;
            let key_ids = issuer_ids(&msg);
            let trust = if keyring.is_empty() {
                if !allow_unsigned {
                    return Err(SignedChecksumError::NoKeyring {
                        file,
                        key_ids,
                        looked: keyring.describe(),
                    });
                }
                Trust::SignatureNotChecked { key_ids }
            } else {
                match keyring.signer_of(&msg) {
                    SignerFound::Valid(signer) => Trust::Signed {
                        signer,
                        keyring: keyring.describe(),
                    },
                    // Refused like a revoked key's, --allow-unsigned or not.
                    SignerFound::Expired(signer, at) => {
                        return Err(SignedChecksumError::ExpiredKey {
                            file,
                            signer: signer.to_string(),
                            expired: utc_text(at),
                        });
                    }
                    // A bad signature is never accepted, --allow-unsigned or not:
                    // it means the file was changed.
                    SignerFound::Nobody => {
                        return Err(SignedChecksumError::BadSignature {
                            file,
                            key_ids,
                            keyring: keyring.describe(),
                        });
                    }
                }
            };
            (trust, msg.signed_text())
        }
        None => {
            if !allow_unsigned {
                return Err(SignedChecksumError::Unsigned { file });
            }
            (Trust::Unsigned, text.to_string())
        }
    };
    let entries = parse_entries(&body);
    if entries.is_empty() {
        return Err(SignedChecksumError::NoEntries { file });
    }
    Ok(CheckedFile {
        origin: origin.to_string(),
        trust,
        entries,
    })
}

fn issuer_ids(msg: &CleartextSignedMessage) -> String {
    let mut ids: Vec<String> = Vec::new();
    for sig in msg.signatures() {
        for fp in sig.issuer_fingerprint() {
            ids.push(format!("{fp:X}"));
        }
        if sig.issuer_fingerprint().is_empty() {
            for id in sig.issuer_key_id() {
                ids.push(hex(id.as_ref()).to_uppercase());
            }
        }
    }
    if ids.is_empty() {
        "unknown".into()
    } else {
        ids.join(", ")
    }
}

/// The SHA-256 lines of a checksum file: Fedora's `SHA256 (NAME) = HEX` and
/// sha256sum's `HEX  NAME` / `HEX *NAME`. Comments, other algorithms and lines
/// that are neither are passed over.
pub fn parse_entries(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("SHA256 (")
            && let Some((name, hash)) = rest.rsplit_once(") = ")
            && let Some(sha256) = parse_sha256(hash.trim())
        {
            entries.push(Entry {
                name: name.to_string(),
                sha256,
            });
            continue;
        }
        if line.len() > 66
            && let Some(sha256) = line.get(..64).and_then(parse_sha256)
            && line.as_bytes()[64] == b' '
        {
            let name = &line[65..];
            let name = name
                .strip_prefix('*')
                .or_else(|| name.strip_prefix(' '))
                .unwrap_or(name);
            if !name.is_empty() {
                entries.push(Entry {
                    name: name.to_string(),
                    sha256,
                });
            }
        }
    }
    entries
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What `--checksum`, discovery or a download found out about an image, for the
/// plan, the report and `--json`'s `checksum` object.
#[derive(Debug, Clone, Serialize)]
pub struct ChecksumReport {
    /// The checksum file (path or URL).
    pub file: String,
    /// The image's name as the file lists it.
    pub image: String,
    pub trust: Trust,
    /// Whether the file's signature was good (false when unsigned or unchecked).
    pub signed: bool,
    pub expected_sha256: String,
    /// None until the image has been read (a dry run does not read it).
    pub actual_sha256: Option<String>,
    pub matched: Option<bool>,
    /// True when the file was found beside the image rather than named.
    pub discovered: bool,
}

impl ChecksumReport {
    pub fn new(checked: &CheckedFile, image: &str, expected: &[u8; 32], discovered: bool) -> Self {
        ChecksumReport {
            file: checked.origin.clone(),
            image: image.to_string(),
            signed: matches!(checked.trust, Trust::Signed { .. }),
            trust: checked.trust.clone(),
            expected_sha256: hex(expected),
            actual_sha256: None,
            matched: None,
            discovered,
        }
    }

    /// One line for the plan and the report.
    pub fn summary(&self) -> String {
        let state = match self.matched {
            Some(true) => "sha256 matched",
            Some(false) => "sha256 DID NOT match",
            None => "sha256 checked before writing",
        };
        format!(
            "checksum {}: {state}; {}{}",
            self.file,
            self.trust.describe(),
            if self.discovered {
                " (found beside the image)"
            } else {
                ""
            }
        )
    }
}

/// Whether and how the source image was checked against a published checksum.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum SourceCheck {
    Checked(ChecksumReport),
    /// No checksum file was given and none was found: why, for the report.
    NotChecked {
        why: String,
    },
}

impl SourceCheck {
    pub fn summary(&self) -> String {
        match self {
            SourceCheck::Checked(r) => r.summary(),
            SourceCheck::NotChecked { why } => format!("no published checksum checked: {why}"),
        }
    }
}

/// The user's choices for checking a source against a checksum file.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// `--checksum FILE`.
    pub checksum: Option<PathBuf>,
    /// `--keyring FILE|DIR`.
    pub keyring: Option<PathBuf>,
    pub allow_unsigned: bool,
}

/// What lies beside an image: the checksum file that lists it, or the ones that
/// do not (so the report can say why nothing was checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    Found(PathBuf),
    NotListed(Vec<PathBuf>),
    Nothing,
}

/// Looks beside `image` for a `*-CHECKSUM` (or `CHECKSUM`) file that lists it.
pub fn discover(image: &Path) -> Discovery {
    let Some(name) = image.file_name().and_then(|n| n.to_str()) else {
        return Discovery::Nothing;
    };
    let dir = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(read) = std::fs::read_dir(&dir) else {
        return Discovery::Nothing;
    };
    let mut candidates: Vec<PathBuf> = read
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n == "CHECKSUM" || n.ends_with("-CHECKSUM"))
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    candidates.sort();
    if candidates.is_empty() {
        return Discovery::Nothing;
    }
    for candidate in &candidates {
        let Ok(file) = File::open(candidate) else {
            continue;
        };
        let mut text = String::new();
        if file
            .take(MAX_CHECKSUM_LEN)
            .read_to_string(&mut text)
            .is_err()
        {
            continue;
        }
        if parse_entries(&text)
            .iter()
            .any(|e| e.name == name || e.name.rsplit('/').next() == Some(name))
        {
            return Discovery::Found(candidate.clone());
        }
    }
    Discovery::NotListed(candidates)
}

/// Finds the checksum file for a local image (`--checksum`, or one beside it),
/// checks its signature and that it lists the image. The image itself is read
/// later ([`verify_image`]), so that a dry run stays cheap.
pub fn plan_local(image: &Path, opts: &CheckOptions) -> Result<SourceCheck, SignedChecksumError> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (path, discovered) = match &opts.checksum {
        Some(path) => (path.clone(), false),
        None => match discover(image) {
            Discovery::Found(path) => (path, true),
            Discovery::NotListed(files) => {
                let why = format!(
                    "{} beside the image do not list {name}; give the image's CHECKSUM with --checksum",
                    files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(SourceCheck::NotChecked { why });
            }
            Discovery::Nothing => {
                let why = format!(
                    "no *-CHECKSUM file beside {} and none given (--checksum)",
                    image.display()
                );
                return Ok(SourceCheck::NotChecked { why });
            }
        },
    };
    let keyring = Keyring::load(opts.keyring.as_deref())?;
    let checked = read_file(&path, &keyring, opts.allow_unsigned)?;
    let expected = checked.expected(&name)?;
    Ok(SourceCheck::Checked(ChecksumReport::new(
        &checked, &name, &expected, discovered,
    )))
}

/// The API for a streamed source: the verified expected sha256 of the image
/// called `image_name` in `checksum_file`, after its signature was checked against
/// `keyring` (default: Fedora's keys on this system). Compare it with the sha256
/// of the stream before the stream's first MiB (its partition table) is written.
pub fn expected_sha256(
    checksum_file: &Path,
    image_name: &str,
    keyring: Option<&Path>,
    allow_unsigned: bool,
) -> Result<([u8; 32], ChecksumReport), SignedChecksumError> {
    let keyring = Keyring::load(keyring)?;
    let checked = read_file(checksum_file, &keyring, allow_unsigned)?;
    let expected = checked.expected(image_name)?;
    let report = ChecksumReport::new(&checked, image_name, &expected, false);
    Ok((expected, report))
}

/// Reads the whole image and compares its sha256 with the report's expected
/// value; a mismatch is an error (nothing has been written yet).
pub fn verify_image(
    image: &Path,
    report: &mut ChecksumReport,
    progress: &Progress,
) -> Result<(), SignedChecksumError> {
    let read_error = |source| SignedChecksumError::ReadImage {
        path: image.to_path_buf(),
        source,
    };
    let file = File::open(image).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    progress.phase("sha256", len);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let digest = sha256_with_progress(&mut reader, progress).map_err(read_error)?;
    finish_compare(image, report, digest)
}

fn sha256_with_progress(reader: &mut impl Read, progress: &Progress) -> io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        progress.inc(n as u64);
    }
    Ok(hasher.finalize().into())
}

/// Records `actual` in the report and fails on a mismatch.
pub fn finish_compare(
    image: &Path,
    report: &mut ChecksumReport,
    actual: [u8; 32],
) -> Result<(), SignedChecksumError> {
    let actual = hex(&actual);
    let matched = actual == report.expected_sha256;
    report.actual_sha256 = Some(actual.clone());
    report.matched = Some(matched);
    if matched {
        Ok(())
    } else {
        Err(SignedChecksumError::Mismatch {
            image: image.display().to_string(),
            file: report.file.clone(),
            expected: report.expected_sha256.clone(),
            actual,
        })
    }
}

/// Seconds since the epoch as RFC 3339 UTC (civil date from days, Howard Hinnant's
/// algorithm: no time-zone database needed for UTC).
pub fn utc_text(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1f8b0000000000000000000000000000000000000000000000000000000000aa";

    #[test]
    fn parses_fedora_and_sha256sum_lines() {
        let text = format!(
            "# Fedora-x.iso: 123 bytes\nSHA256 (Fedora-x.iso) = {A}\nMD5 (Fedora-x.iso) = 00\n{A}  plain.iso\n{A} *binary.iso\nnonsense\n"
        );
        let names: Vec<String> = parse_entries(&text).into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["Fedora-x.iso", "plain.iso", "binary.iso"]);
    }

    #[test]
    fn unsigned_refused_unless_allowed() {
        let text = format!("{A}  a.iso\n");
        let ring = Keyring::default();
        assert!(matches!(
            check_text("f", &text, &ring, false),
            Err(SignedChecksumError::Unsigned { .. })
        ));
        let checked = check_text("f", &text, &ring, true).unwrap();
        assert_eq!(checked.trust, Trust::Unsigned);
        assert!(matches!(
            checked.expected("b.iso"),
            Err(SignedChecksumError::NameMissing { .. })
        ));
        assert_eq!(hex(&checked.expected("a.iso").unwrap()), A);
    }

    #[test]
    fn a_file_without_lines_is_not_a_checksum_file() {
        assert!(matches!(
            check_text("f", "hello\n", &Keyring::default(), true),
            Err(SignedChecksumError::NoEntries { .. })
        ));
    }
}
