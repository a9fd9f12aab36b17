//! Signed CHECKSUM files (`source::signed_checksum`): keys made with the real `gpg`
//! in a temporary GNUPGHOME, CHECKSUMs clearsigned by it in Fedora's format, and
//! every way the check can fail refused before the target is touched (the target's
//! bytes are compared before and after).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use crate::support::dm_snapshot::hex;
use crate::support::*;

/// A name the CHECKSUM lists and discovery derives nothing from.
pub const ISO_NAME: &str = "Fedora-Test-Live-42-1.1.x86_64.iso";
pub const CHECKSUM_NAME: &str = "Fedora-Test-42-1.1-x86_64-CHECKSUM";

/// Two signing keys in one temporary GNUPGHOME: `good` (RSA, like Fedora's) and
/// `wrong` (ed25519), each exported as an armored public key file.
pub struct Keys {
    home: tempfile::TempDir,
    pub good: PathBuf,
    pub good_fingerprint: String,
    pub wrong: PathBuf,
    /// A key revoked after it signed `revoked_checksum` (the fixture ISO's).
    pub revoked: PathBuf,
    pub revoked_checksum: String,
    /// The same key exported before it was revoked (the control).
    pub before_revocation: PathBuf,
    /// A key made on 2020-01-01 valid for one day, and a CHECKSUM of the fixture ISO
    /// it signed that day (gpg with a faked clock).
    pub expired: PathBuf,
    pub expired_checksum: String,
}

const GOOD_UID: &str = "Livestick Test Signer <signer@example.org>";
const WRONG_UID: &str = "Someone Else <else@example.org>";
const REVOKED_UID: &str = "Revoked Signer <revoked@example.org>";
const EXPIRED_UID: &str = "Expired Signer <expired@example.org>";

/// gpg-agent is one per GNUPGHOME: the tests' gpg runs take turns, and each stops
/// the agent again so that nothing outlives the test process.
static GPG: Mutex<()> = Mutex::new(());

fn gpg(home: &Path, args: &[&str]) -> Output {
    let _turn = GPG.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args([
            "--batch",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ])
        .args(args)
        .output()
        .expect("gpg runs (scripts/deps.sh installs gnupg)");
    let _ = Command::new("gpgconf")
        .env("GNUPGHOME", home)
        .args(["--kill", "gpg-agent"])
        .output();
    assert!(
        out.status.success(),
        "gpg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let home = tempfile::Builder::new()
            .prefix("lsgpg-")
            .tempdir()
            .expect("a GNUPGHOME");
        let h = home.path();
        gpg(
            h,
            &["--quick-gen-key", GOOD_UID, "rsa2048", "sign", "never"],
        );
        gpg(
            h,
            &["--quick-gen-key", WRONG_UID, "ed25519", "sign", "never"],
        );
        let export = |uid: &str, name: &str| {
            let path = h.join(name);
            gpg(
                h,
                &[
                    "--armor",
                    "--output",
                    path.to_str().unwrap(),
                    "--export",
                    uid,
                ],
            );
            path
        };
        let good = export(GOOD_UID, "good.asc");
        let wrong = export(WRONG_UID, "wrong.asc");
        // Signed while good, then revoked with the certificate gpg made for it.
        gpg(
            h,
            &["--quick-gen-key", REVOKED_UID, "ed25519", "sign", "never"],
        );
        let revoked_checksum = clearsign(
            h,
            REVOKED_UID,
            &format!("SHA256 ({ISO_NAME}) = {}\n", iso_sha256()),
        );
        let fingerprint_of = |uid: &str| {
            String::from_utf8_lossy(&gpg(h, &["--with-colons", "--fingerprint", uid]).stdout)
                .lines()
                .find(|l| l.starts_with("fpr:"))
                .and_then(|l| l.split(':').nth(9))
                .expect("gpg lists the fingerprint")
                .to_string()
        };
        let rev = h
            .join("openpgp-revocs.d")
            .join(format!("{}.rev", fingerprint_of(REVOKED_UID)));
        let certificate = std::fs::read_to_string(&rev)
            .expect("gpg keeps a revocation certificate")
            .replace(":-----BEGIN", "-----BEGIN");
        let before_revocation = export(REVOKED_UID, "before-revocation.asc");
        let rev_path = h.join("revoke.asc");
        std::fs::write(&rev_path, certificate).unwrap();
        gpg(h, &["--import", rev_path.to_str().unwrap()]);
        let revoked = export(REVOKED_UID, "revoked.asc");
        gpg(
            h,
            &[
                "--faked-system-time",
                "20200101T000000!",
                "--quick-gen-key",
                EXPIRED_UID,
                "ed25519",
                "sign",
                "1d",
            ],
        );
        let expired_checksum = {
            let scratch = tmp();
            let input = scratch.path().join("CHECKSUM.in");
            let output = scratch.path().join("CHECKSUM.asc");
            std::fs::write(&input, format!("SHA256 ({ISO_NAME}) = {}\n", iso_sha256())).unwrap();
            gpg(
                h,
                &[
                    "--faked-system-time",
                    "20200101T120000!",
                    "--local-user",
                    EXPIRED_UID,
                    "--digest-algo",
                    "SHA256",
                    "--clearsign",
                    "--output",
                    output.to_str().unwrap(),
                    input.to_str().unwrap(),
                ],
            );
            std::fs::read_to_string(&output).unwrap()
        };
        let expired = export(EXPIRED_UID, "expired.asc");
        let listing =
            String::from_utf8_lossy(&gpg(h, &["--with-colons", "--fingerprint", GOOD_UID]).stdout)
                .into_owned();
        let good_fingerprint = listing
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .expect("gpg lists the fingerprint")
            .to_string();
        Keys {
            home,
            good,
            good_fingerprint,
            wrong,
            revoked,
            revoked_checksum,
            before_revocation,
            expired,
            expired_checksum,
        }
    })
}

/// Which key signs a CHECKSUM.
#[derive(Clone, Copy)]
pub enum SignedBy {
    Good,
    Wrong,
    Nobody,
}

/// The text of a Fedora CHECKSUM for `entries` (name, sha256), signed as asked.
pub fn checksum_text(entries: &[(&str, &str)], by: SignedBy) -> String {
    let mut body = String::new();
    for (name, sha) in entries {
        body.push_str(&format!("# {name}: 1 bytes\nSHA256 ({name}) = {sha}\n"));
    }
    let uid = match by {
        SignedBy::Good => GOOD_UID,
        SignedBy::Wrong => WRONG_UID,
        SignedBy::Nobody => return body,
    };
    clearsign(keys().home.path(), uid, &body)
}

fn clearsign(home: &Path, uid: &str, body: &str) -> String {
    let scratch = tmp();
    let input = scratch.path().join("CHECKSUM.in");
    let output = scratch.path().join("CHECKSUM.asc");
    std::fs::write(&input, body).unwrap();
    gpg(
        home,
        &[
            "--local-user",
            uid,
            "--digest-algo",
            "SHA256",
            "--clearsign",
            "--output",
            output.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
    );
    std::fs::read_to_string(&output).unwrap()
}

/// A directory with the fixture ISO under Fedora's name (a symlink: the check
/// reads through it), and a target image file holding random bytes.
struct Scene {
    dir: tempfile::TempDir,
    iso: PathBuf,
    target: PathBuf,
    /// The target's sha256 before any write, which a refusal must leave.
    target_before: String,
}

impl Scene {
    fn new() -> Scene {
        Scene::with_source(&synthetic_iso("fedora-classic.iso"), ISO_NAME)
    }

    /// The scene with `source` linked under `name`.
    fn with_source(source: &Path, name: &str) -> Scene {
        let dir = tmp();
        let iso = dir.path().join(name);
        std::os::unix::fs::symlink(source, &iso).unwrap();
        let target = dir.path().join("stick.img");
        fill_random(&target, 2 << 20);
        let target_before = sha256_file(&target);
        Scene {
            dir,
            iso,
            target,
            target_before,
        }
    }

    /// The ISO as a copy with its last byte changed (inside the volume's padding,
    /// so only a whole-file hash can tell).
    fn tamper_iso(&self) {
        let bytes = {
            let mut b = std::fs::read(&self.iso).unwrap();
            let last = b.len() - 1;
            b[last] ^= 0x5a;
            b
        };
        std::fs::remove_file(&self.iso).unwrap();
        std::fs::write(&self.iso, bytes).unwrap();
    }

    fn checksum(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn write(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "--json",
            "write",
            self.iso.to_str().unwrap(),
            self.target.to_str().unwrap(),
            "--size",
            "64M",
            "--volume-id",
            "1234ABCD",
        ];
        args.extend_from_slice(extra);
        livestick(&args)
    }
}

fn iso_sha256() -> String {
    sha256_file(&synthetic_iso("fedora-classic.iso"))
}

/// A refused write: exit 2, the message names the cause, the target is as it was.
fn refused(scene: &Scene, out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert_eq!(
        scene.target_before,
        sha256_file(&scene.target),
        "the target changed although the check refused"
    );
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&ok(out).into_bytes()).expect("one JSON report")
}

#[test]
fn a_good_signature_and_matching_sha256_are_reported_then_written() {
    let scene = Scene::new();
    let keys = keys();
    let text = checksum_text(
        &[("other.iso", &"0".repeat(64)), (ISO_NAME, &iso_sha256())],
        SignedBy::Good,
    );
    let file = scene.checksum("my-CHECKSUM-copy", &text);
    let out = scene.write(&[
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.good.to_str().unwrap(),
    ]);
    let json = report(&out);
    crate::support::schema::assert_valid(&json, "write-report");
    let check = &json["checksum"];
    assert_eq!(check["status"], "checked", "{check}");
    assert_eq!(check["matched"], true);
    assert_eq!(check["signed"], true);
    assert_eq!(check["discovered"], false);
    assert_eq!(check["actual_sha256"], iso_sha256().as_str());
    assert_eq!(check["trust"]["kind"], "signed");
    assert_eq!(
        check["trust"]["signer"]["fingerprint"],
        keys.good_fingerprint.as_str()
    );
    assert_eq!(check["trust"]["signer"]["user_id"], GOOD_UID);
    // Written for real: the stick has its partition table and the live files.
    let offset = sfdisk(&scene.target)["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512;
    assert!(fat_ls(&scene.target, offset, "/LiveOS").contains("squashfs"));
}

#[test]
fn a_checksum_beside_the_image_is_found_and_a_keyring_directory_is_read() {
    let scene = Scene::new();
    let keys = keys();
    let text = checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Good);
    scene.checksum(CHECKSUM_NAME, &text);
    // A directory of keys, with a file that is no key beside them.
    let ring = scene.dir.path().join("keys");
    std::fs::create_dir(&ring).unwrap();
    std::fs::copy(&keys.wrong, ring.join("RPM-GPG-KEY-else")).unwrap();
    std::fs::copy(&keys.good, ring.join("RPM-GPG-KEY-test")).unwrap();
    std::fs::write(ring.join("README"), "not a key\n").unwrap();
    let out = scene.write(&["--dry-run", "--keyring", ring.to_str().unwrap()]);
    let plan = crate::support::schema::valid_document(&ok(&out).into_bytes(), "write-plan");
    let notes = plan["notes"].to_string();
    assert!(notes.contains(CHECKSUM_NAME), "{notes}");
    assert!(notes.contains("signed by Livestick Test Signer"), "{notes}");
    assert!(notes.contains("found beside the image"), "{notes}");
    // A dry run checks the signature and the name, and does not read the image.
    assert_eq!(plan["checksum"]["status"], "checked");
    assert_eq!(plan["checksum"]["matched"], serde_json::Value::Null);
    assert_eq!(plan["checksum"]["expected_sha256"], iso_sha256().as_str());
    let json = report(&scene.write(&["--keyring", ring.to_str().unwrap()]));
    assert_eq!(json["checksum"]["discovered"], true);
    assert_eq!(json["checksum"]["matched"], true);
}

#[test]
fn a_tampered_image_is_refused_even_with_noverify() {
    let scene = Scene::new();
    let keys = keys();
    let text = checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Good);
    let file = scene.checksum(CHECKSUM_NAME, &text);
    scene.tamper_iso();
    let keyring = keys.good.to_str().unwrap();
    for extra in [&[][..], &["--noverify"][..]] {
        let mut args = vec!["--checksum", file.to_str().unwrap(), "--keyring", keyring];
        args.extend_from_slice(extra);
        refused(&scene, &scene.write(&args), "does not match its checksum");
    }
}

#[test]
fn a_tampered_checksum_file_fails_its_signature() {
    let scene = Scene::new();
    let keys = keys();
    let sha = iso_sha256();
    let text = checksum_text(&[(ISO_NAME, &sha)], SignedBy::Good);
    // The hash of the (tampered) image put in place of the signed one.
    let forged = text.replace(&sha, &"ab".repeat(32));
    assert_ne!(forged, text);
    let file = scene.checksum(CHECKSUM_NAME, &forged);
    let out = scene.write(&[
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.good.to_str().unwrap(),
    ]);
    refused(&scene, &out, "does not verify");
    // --allow-unsigned never excuses a bad signature.
    let out = scene.write(&[
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.good.to_str().unwrap(),
        "--allow-unsigned",
    ]);
    refused(&scene, &out, "does not verify");
}

#[test]
fn a_checksum_signed_by_another_key_is_refused() {
    let scene = Scene::new();
    let keys = keys();
    let text = checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Wrong);
    let file = scene.checksum(CHECKSUM_NAME, &text);
    let out = scene.write(&[
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.good.to_str().unwrap(),
    ]);
    refused(&scene, &out, "does not verify with any unrevoked key");
}

#[test]
fn a_signature_by_a_revoked_key_is_refused() {
    let scene = Scene::new();
    let keys = keys();
    let file = scene.checksum(CHECKSUM_NAME, &keys.revoked_checksum);
    let out = scene.write(&[
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.revoked.to_str().unwrap(),
    ]);
    refused(&scene, &out, "does not verify with any unrevoked key");
    // The control: the same signature is good by the key as it was before.
    let out = scene.write(&[
        "--dry-run",
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.before_revocation.to_str().unwrap(),
    ]);
    assert!(ok(&out).contains("signed by Revoked Signer"));
}

#[test]
fn an_unsigned_checksum_is_refused_unless_allowed() {
    let scene = Scene::new();
    // sha256sum's own format, unsigned.
    let text = format!("{}  {ISO_NAME}\n", iso_sha256());
    let file = scene.checksum("SHA256SUMS", &text);
    let args = ["--checksum", file.to_str().unwrap()];
    refused(&scene, &scene.write(&args), "is not signed");
    let fedora_style = checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Nobody);
    let file2 = scene.checksum(CHECKSUM_NAME, &fedora_style);
    refused(
        &scene,
        &scene.write(&["--checksum", file2.to_str().unwrap()]),
        "--allow-unsigned",
    );
    let json = report(&scene.write(&["--checksum", file.to_str().unwrap(), "--allow-unsigned"]));
    assert_eq!(json["checksum"]["matched"], true);
    assert_eq!(json["checksum"]["signed"], false);
    assert_eq!(json["checksum"]["trust"]["kind"], "unsigned");
}

#[test]
fn a_checksum_without_the_images_name_is_a_clear_error() {
    let scene = Scene::new();
    let keys = keys();
    let text = checksum_text(&[("Fedora-Other-42.iso", &iso_sha256())], SignedBy::Good);
    let file = scene.checksum(CHECKSUM_NAME, &text);
    let out = scene.write(&[
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.good.to_str().unwrap(),
    ]);
    refused(&scene, &out, &format!("has no checksum for {ISO_NAME}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Fedora-Other-42.iso"),
        "it names what it lists: {stderr}"
    );
}

#[test]
fn a_write_with_nothing_to_check_says_so() {
    let scene = Scene::new();
    let out = livestick(&[
        "write",
        scene.iso.to_str().unwrap(),
        scene.target.to_str().unwrap(),
        "--size",
        "64M",
        "--noverify",
    ]);
    let text = ok(&out);
    assert!(text.contains("the image was NOT checked"), "{text}");
    assert!(text.contains("no *-CHECKSUM file beside"), "{text}");
}

/// The API a streamed raw image uses: the expected sha256 after the signature check.
#[test]
fn the_expected_sha256_api_checks_the_signature_first() {
    use livestick::source::signed_checksum::expected_sha256;
    let keys = keys();
    let dir = tmp();
    let sha = iso_sha256();
    let good = dir.path().join("good");
    std::fs::write(
        &good,
        checksum_text(&[("disk.raw.xz", &sha)], SignedBy::Good),
    )
    .unwrap();
    let (expected, report) =
        expected_sha256(&good, "disk.raw.xz", Some(&keys.good), false).unwrap();
    assert_eq!(hex(&expected), sha);
    assert!(report.signed);
    let wrong = dir.path().join("wrong");
    std::fs::write(
        &wrong,
        checksum_text(&[("disk.raw.xz", &sha)], SignedBy::Wrong),
    )
    .unwrap();
    assert!(expected_sha256(&wrong, "disk.raw.xz", Some(&keys.good), false).is_err());
    assert!(expected_sha256(&good, "other.raw.xz", Some(&keys.good), false).is_err());
}

/// Runs livestick under a shell that reaps it and then reads its own
/// `/proc/PID/io`: the kernel adds a reaped child's I/O counts to its parent's, so
/// `rchar` is every byte livestick (and the programs it ran) read. Returns the exit
/// code, stderr and `rchar`.
fn livestick_reading(args: &[&str]) -> (Option<i32>, String, u64) {
    let scratch = tmp();
    let err = scratch.path().join("stderr");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#""$@" >/dev/null 2>"$LS_STDERR"; s=$?; grep '^rchar:' /proc/$$/io; exit $s"#)
        .arg("sh")
        .arg(bin())
        .args(args)
        .env("LS_STDERR", &err)
        .output()
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rchar = stdout
        .trim()
        .strip_prefix("rchar:")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rchar line from /proc/PID/io: {stdout:?}"));
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    (out.status.code(), stderr, rchar)
}

/// The bytes a successful write of the scene's source reads (`rchar`), with the
/// good keyring.
fn write_reading(scene: &Scene, keys: &Keys) -> u64 {
    let args = [
        "--json",
        "write",
        scene.iso.to_str().unwrap(),
        scene.target.to_str().unwrap(),
        "--size",
        "64M",
        "--volume-id",
        "1234ABCD",
        "--keyring",
        keys.good.to_str().unwrap(),
    ];
    let (code, stderr, rchar) = livestick_reading(&args);
    assert_eq!(code, Some(0), "{stderr}");
    rchar
}

/// Issue 15 part 3: a local ISO with a CHECKSUM is read once for both the sha256
/// and the implanted MD5. The same write with and without a CHECKSUM reads about
/// the same bytes; checked separately, the CHECKSUM would cost a whole ISO more.
#[test]
fn the_checksum_and_the_implanted_md5_share_one_read_of_the_iso() {
    let keys = keys();
    let iso_len = std::fs::metadata(synthetic_iso("fedora-classic.iso"))
        .unwrap()
        .len();
    let plain = Scene::new();
    let without = write_reading(&plain, keys);
    let checked = Scene::new();
    checked.checksum(
        CHECKSUM_NAME,
        &checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Good),
    );
    let with = write_reading(&checked, keys);
    assert!(
        without > iso_len,
        "the write reads the ISO at least once ({without} bytes read, ISO {iso_len})"
    );
    assert!(
        with < without + iso_len / 4,
        "a CHECKSUM cost a second read of the ISO: {with} bytes read with it, {without} without (ISO {iso_len})"
    );
    // Both checks did run: the report has the matched sha256 and the passed MD5.
    let json = report(&checked.write(&["--keyring", keys.good.to_str().unwrap()]));
    assert_eq!(json["checksum"]["matched"], true, "{json}");
    assert_eq!(json["checksum"]["actual_sha256"], iso_sha256().as_str());
    assert!(json["iso_md5"].is_string(), "{json}");
}

/// Where a file's data starts in an ISO, from xorriso.
fn iso_file_offset(iso: &Path, path: &str) -> u64 {
    let listing = run(
        "xorriso",
        &[
            "-indev",
            iso.to_str().unwrap(),
            "-find",
            path,
            "-exec",
            "report_lba",
            "--",
        ],
    );
    let lba: u64 = listing
        .lines()
        .find(|l| l.starts_with("File data lba:"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("xorriso lists {path}: {listing}"));
    lba * 2048
}

/// The shared read still refuses what each check refused on its own: a byte
/// changed inside the volume fails the implanted MD5 even when the CHECKSUM
/// describes the changed file, before any target is probed; `--noverify` skips only
/// the MD5, and the CHECKSUM is still checked.
#[test]
fn an_image_failing_its_implanted_md5_is_refused_though_its_checksum_matches() {
    let scene = Scene::new();
    let keys = keys();
    let original = synthetic_iso("fedora-classic.iso");
    let mut bytes = std::fs::read(&original).unwrap();
    let inside = iso_file_offset(&original, "/isolinux/vmlinuz") as usize + 300_000;
    bytes[inside] ^= 0x5a;
    std::fs::remove_file(&scene.iso).unwrap();
    std::fs::write(&scene.iso, &bytes).unwrap();
    let file = scene.checksum(
        CHECKSUM_NAME,
        &checksum_text(&[(ISO_NAME, &sha256_file(&scene.iso))], SignedBy::Good),
    );
    let keyring = keys.good.to_str().unwrap();
    let out = scene.write(&["--checksum", file.to_str().unwrap(), "--keyring", keyring]);
    refused(&scene, &out, "fails its implanted MD5 check");
    // Before any target is probed: a target in a directory that does not exist is
    // not what the refusal is about.
    let out = livestick(&[
        "write",
        scene.iso.to_str().unwrap(),
        "/nonexistent-livestick-dir/stick.img",
        "--keyring",
        keyring,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fails its implanted MD5 check"), "{stderr}");
    let json = report(&scene.write(&[
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keyring,
        "--noverify",
    ]));
    assert_eq!(json["checksum"]["matched"], true, "{json}");
    assert!(json["iso_md5"].is_null(), "{json}");
    // And a mismatching CHECKSUM is refused before any target is probed too.
    scene.checksum(
        CHECKSUM_NAME,
        &checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Good),
    );
    let out = livestick(&[
        "write",
        scene.iso.to_str().unwrap(),
        "/nonexistent-livestick-dir/stick.img",
        "--keyring",
        keyring,
        "--noverify",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match its checksum"), "{stderr}");
}

/// Issue 15 part 3: a CHECKSUM signed by a key that has expired since is refused as
/// a revoked key's is, and the message says expired and when (gpg made the key on
/// 2020-01-01, valid one day, and signed that day). --allow-unsigned does not
/// excuse it.
#[test]
fn a_signature_by_an_expired_key_is_refused_saying_when_it_expired() {
    let scene = Scene::new();
    let keys = keys();
    let file = scene.checksum(CHECKSUM_NAME, &keys.expired_checksum);
    for extra in [&[][..], &["--allow-unsigned"][..]] {
        let mut args = vec![
            "--checksum",
            file.to_str().unwrap(),
            "--keyring",
            keys.expired.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = scene.write(&args);
        refused(&scene, &out, "expired on 2020-01-02T00:00:00Z");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Expired Signer"),
            "names the signer: {stderr}"
        );
    }
    // The same key beside a good one: the good one's signature still counts.
    let both = scene.dir.path().join("keys");
    std::fs::create_dir(&both).unwrap();
    std::fs::copy(&keys.expired, both.join("expired.asc")).unwrap();
    std::fs::copy(&keys.good, both.join("good.asc")).unwrap();
    let text = checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Good);
    let good = scene.checksum("good-CHECKSUM", &text);
    let out = scene.write(&[
        "--dry-run",
        "--checksum",
        good.to_str().unwrap(),
        "--keyring",
        both.to_str().unwrap(),
    ]);
    assert!(ok(&out).contains("signed by Livestick Test Signer"));
}

/// A batch checks the source the same way, once, before any of its targets is
/// probed: a tampered image is refused with every target as it was (one of them in
/// a directory that does not exist, which planning would have refused first).
#[test]
fn a_batch_refuses_a_tampered_image_before_probing_its_targets() {
    let scene = Scene::new();
    let keys = keys();
    let file = scene.checksum(
        CHECKSUM_NAME,
        &checksum_text(&[(ISO_NAME, &iso_sha256())], SignedBy::Good),
    );
    scene.tamper_iso();
    let second = scene.dir.path().join("second.img");
    fill_random(&second, 2 << 20);
    let before = sha256_file(&second);
    let out = livestick(&[
        "write",
        scene.iso.to_str().unwrap(),
        scene.target.to_str().unwrap(),
        second.to_str().unwrap(),
        "/nonexistent-livestick-dir/third.img",
        "--size",
        "64M",
        "--checksum",
        file.to_str().unwrap(),
        "--keyring",
        keys.good.to_str().unwrap(),
        "--yes",
    ]);
    refused(&scene, &out, "does not match its checksum");
    assert_eq!(sha256_file(&second), before, "the second target changed");
}

/// The fixture's zstd copy under Fedora's name, and its sha256.
fn compressed_scene() -> (Scene, String) {
    const ZST_NAME: &str = "Fedora-Test-Live-42-1.1.x86_64.iso.zst";
    let (_, copies) = crate::compressed::copies();
    let zst = copies
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "zst"))
        .expect("a zstd copy");
    (Scene::with_source(zst, ZST_NAME), sha256_file(zst))
}

/// Issue 15 part 1: a compressed ISO's CHECKSUM (which describes the compressed
/// file) is hashed from the bytes the decompressor reads, so the compressed file is
/// read once: the same write with and without a CHECKSUM reads about the same
/// bytes; checked on its own, the CHECKSUM would cost the compressed file again.
#[test]
fn a_compressed_iso_and_its_checksum_share_one_read() {
    let keys = keys();
    let (plain, sha) = compressed_scene();
    let name = plain.iso.file_name().unwrap().to_str().unwrap().to_string();
    let compressed_len = std::fs::metadata(&plain.iso).unwrap().len();
    let without = write_reading(&plain, keys);
    let (checked, _) = compressed_scene();
    checked.checksum(
        CHECKSUM_NAME,
        &checksum_text(&[(&name, &sha)], SignedBy::Good),
    );
    let with = write_reading(&checked, keys);
    assert!(
        without > compressed_len,
        "the write reads the compressed ISO at least once ({without} bytes read, file {compressed_len})"
    );
    assert!(
        with < without + compressed_len / 4,
        "a CHECKSUM cost a second read of the compressed ISO: {with} bytes read with it, {without} without (file {compressed_len})"
    );
    // Both checks ran: the compressed file's sha256 matched, the unpacked ISO's MD5 passed.
    let json = report(&checked.write(&["--keyring", keys.good.to_str().unwrap()]));
    assert_eq!(json["checksum"]["matched"], true, "{json}");
    assert_eq!(json["checksum"]["actual_sha256"], sha.as_str());
    assert!(json["iso_md5"].is_string(), "{json}");
}

/// A compressed ISO that unpacks cleanly but is not the one its CHECKSUM names is
/// refused when the stream ends, before the target is touched, with `--noverify`
/// too; a stream the decompressor rejects is refused for that, also with a CHECKSUM.
#[test]
fn a_compressed_iso_its_checksum_does_not_describe_is_refused_before_the_target() {
    let keys = keys();
    let keyring = keys.good.to_str().unwrap();
    let (scene, _) = compressed_scene();
    let name = scene.iso.file_name().unwrap().to_str().unwrap().to_string();
    let other = "ab".repeat(32);
    let file = scene.checksum(
        CHECKSUM_NAME,
        &checksum_text(&[(&name, &other)], SignedBy::Good),
    );
    for extra in [&[][..], &["--noverify"][..]] {
        let mut args = vec!["--checksum", file.to_str().unwrap(), "--keyring", keyring];
        args.extend_from_slice(extra);
        refused(&scene, &scene.write(&args), "does not match its checksum");
    }
    // A byte flipped mid-stream: the decompressor's error, not the checksum's.
    let (bad, _) = compressed_scene();
    let mut bytes = std::fs::read(&bad.iso).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::remove_file(&bad.iso).unwrap();
    std::fs::write(&bad.iso, &bytes).unwrap();
    let sha = {
        use sha2::Digest;
        hex(&sha2::Sha256::digest(&bytes))
    };
    bad.checksum(
        CHECKSUM_NAME,
        &checksum_text(&[(&name, &sha)], SignedBy::Good),
    );
    refused(&bad, &bad.write(&["--keyring", keyring]), "decompressing ");
}
