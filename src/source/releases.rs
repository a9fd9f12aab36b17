//! Release names (`fedora:42/workstation/x86_64`) resolved through Fedora's
//! `releases.json`, the index Fedora Media Writer reads: a JSON list of objects
//! with `version`, `arch`, `variant`, `subvariant`, `link`, `sha256` and `size`.

use serde::Deserialize;
use thiserror::Error;

use crate::error::{Classify, ErrorKind};

/// The index Fedora Media Writer reads; `--releases-url` points elsewhere.
pub const DEFAULT_RELEASES_URL: &str = "https://fedoraproject.org/releases.json";

const PREFIX: &str = "fedora:";

#[derive(Debug, Error)]
pub enum ReleaseError {
    #[error(
        "{spec:?} is not a release name: write fedora:VERSION/VARIANT[/ARCH], e.g. fedora:42/workstation/x86_64"
    )]
    Syntax { spec: String },
    #[error(
        "the release index {url} is not Fedora's releases.json format ({detail}); check --releases-url"
    )]
    Format { url: String, detail: String },
    #[error("the release index {url} has no {spec}; it has, for that version and arch: {known}")]
    NotFound {
        url: String,
        spec: String,
        known: String,
    },
}

impl Classify for ReleaseError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadInput
    }
}

/// One downloadable image of the index (unknown fields are ignored).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Release {
    pub version: String,
    pub arch: String,
    #[serde(default)]
    pub variant: String,
    #[serde(default)]
    pub subvariant: String,
    pub link: String,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default, deserialize_with = "size_text")]
    pub size: Option<u64>,
}

/// releases.json writes sizes as strings ("2300846080"); accept numbers too.
fn size_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Size>::deserialize(d)? {
        Some(Size::Number(n)) => Some(n),
        Some(Size::Text(t)) => t.trim().parse().ok(),
        None => None,
    })
}

/// A parsed release name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSpec {
    pub version: String,
    pub variant: String,
    pub arch: String,
}

impl std::fmt::Display for ReleaseSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fedora:{}/{}/{}", self.version, self.variant, self.arch)
    }
}

/// Whether a source argument is a release name rather than a path or URL.
pub fn is_release_name(source: &str) -> bool {
    source.starts_with(PREFIX)
}

/// `fedora:VERSION/VARIANT[/ARCH]`; ARCH defaults to x86_64.
pub fn parse_spec(spec: &str) -> Result<ReleaseSpec, ReleaseError> {
    let syntax = || ReleaseError::Syntax {
        spec: spec.to_string(),
    };
    let rest = spec.strip_prefix(PREFIX).ok_or_else(syntax)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (version, variant, arch) = match parts.as_slice() {
        [v, s] => (*v, *s, "x86_64"),
        [v, s, a] => (*v, *s, *a),
        _ => return Err(syntax()),
    };
    if version.is_empty() || variant.is_empty() || arch.is_empty() {
        return Err(syntax());
    }
    Ok(ReleaseSpec {
        version: version.to_string(),
        variant: variant.to_ascii_lowercase(),
        arch: arch.to_string(),
    })
}

/// Picks the image a release name means. The variant is matched against
/// `subvariant` first (Workstation, KDE, Server…), then `variant`; of several
/// matches an ISO is preferred over a raw image, and a live or DVD ISO over a
/// network installer.
pub fn resolve(url: &str, json: &str, spec: &ReleaseSpec) -> Result<Release, ReleaseError> {
    let all: Vec<Release> = serde_json::from_str(json).map_err(|e| ReleaseError::Format {
        url: url.to_string(),
        detail: e.to_string(),
    })?;
    let same_build: Vec<&Release> = all
        .iter()
        .filter(|r| r.version.eq_ignore_ascii_case(&spec.version) && r.arch == spec.arch)
        .collect();
    let by = |field: fn(&Release) -> &str| -> Vec<&Release> {
        same_build
            .iter()
            .copied()
            .filter(|r| field(r).eq_ignore_ascii_case(&spec.variant))
            .collect()
    };
    let mut matches = by(|r| r.subvariant.as_str());
    if matches.is_empty() {
        matches = by(|r| r.variant.as_str());
    }
    let rank = |r: &Release| {
        let name = r.link.rsplit('/').next().unwrap_or("").to_ascii_lowercase();
        match (name.ends_with(".iso"), name.contains("netinst")) {
            (true, false) => 0,
            (true, true) => 1,
            (false, _) => 2,
        }
    };
    matches.sort_by_key(|r| rank(r));
    match matches.first() {
        Some(release) => Ok((*release).clone()),
        None => {
            let mut known: Vec<String> = same_build
                .iter()
                .map(|r| {
                    if r.subvariant.is_empty() {
                        r.variant.to_ascii_lowercase()
                    } else {
                        r.subvariant.to_ascii_lowercase()
                    }
                })
                .collect();
            known.sort();
            known.dedup();
            Err(ReleaseError::NotFound {
                url: url.to_string(),
                spec: spec.to_string(),
                known: if known.is_empty() {
                    "nothing".into()
                } else {
                    known.join(", ")
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = r#"[
      {"version":"42","arch":"x86_64","variant":"Server","subvariant":"Server","link":"https://h/Fedora-Server-netinst-x86_64-42-1.1.iso","sha256":"aa","size":"1000"},
      {"version":"42","arch":"x86_64","variant":"Server","subvariant":"Server","link":"https://h/Fedora-Server-dvd-x86_64-42-1.1.iso","sha256":"bb","size":"2000"},
      {"version":"42","arch":"x86_64","variant":"Workstation","subvariant":"Workstation","link":"https://h/Fedora-Workstation-Live-42-1.1.x86_64.iso","sha256":"cc","size":2300846080},
      {"version":"42","arch":"aarch64","variant":"Workstation","subvariant":"Workstation","link":"https://h/Fedora-Workstation-42-1.1.aarch64.raw.xz","sha256":"dd","size":"3"},
      {"version":"41","arch":"x86_64","variant":"Spins","subvariant":"KDE","link":"https://h/Fedora-KDE-Live-x86_64-41-1.4.iso","sha256":"ee"}
    ]"#;

    #[test]
    fn resolves_names() {
        let get = |s: &str| resolve("u", INDEX, &parse_spec(s).unwrap()).unwrap();
        let ws = get("fedora:42/workstation/x86_64");
        assert_eq!(ws.sha256.as_deref(), Some("cc"));
        assert_eq!(ws.size, Some(2300846080));
        assert_eq!(get("fedora:42/Workstation").sha256.as_deref(), Some("cc"));
        assert_eq!(get("fedora:42/server/x86_64").sha256.as_deref(), Some("bb"));
        assert_eq!(get("fedora:41/kde/x86_64").sha256.as_deref(), Some("ee"));
        assert_eq!(get("fedora:42/workstation/aarch64").size, Some(3));
    }

    #[test]
    fn unknown_names_say_what_exists() {
        let err = resolve("u", INDEX, &parse_spec("fedora:42/kde/x86_64").unwrap()).unwrap_err();
        assert!(err.to_string().contains("server, workstation"), "{err}");
        assert!(parse_spec("fedora:42").is_err());
        assert!(parse_spec("fedora:/x/y").is_err());
        assert!(resolve("u", "<html>", &parse_spec("fedora:1/x").unwrap()).is_err());
    }
}
