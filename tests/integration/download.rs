//! Downloads (`source::download`, `source::releases`): an HTTP(S) server on
//! 127.0.0.1 inside the test serves the image, its signed CHECKSUM and a
//! releases.json, and can drop the connection after N bytes, corrupt a byte, answer
//! 404 or HTML, or stop sending. Nothing leaves the machine.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::signed_checksum::{CHECKSUM_NAME, ISO_NAME, SignedBy, checksum_text, keys};
use crate::support::dm_snapshot::sha256_hex;
use crate::support::*;

/// What the server does to the next request for a path (then it serves normally).
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Sends the headers and this many body bytes, then closes.
    DropAfter(usize),
    /// Flips the byte at this offset of the body.
    Corrupt(usize),
    /// Answers 200 with an HTML page, typed text/html.
    Html,
    /// The same page typed application/octet-stream.
    HtmlAsOctets,
    /// Sends the headers, then nothing for this long.
    Hang(Duration),
}

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, Vec<u8>>>,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    /// Each request: path and Range header.
    log: Mutex<Vec<(String, Option<String>)>>,
}

/// The test server; stops accepting when dropped.
struct Server {
    base: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr: SocketAddr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let state = state.clone();
                            let tls = tls.clone();
                            std::thread::spawn(move || serve(stream, &state, tls));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Server {
            base: format!("http://127.0.0.1:{}", addr.port()),
            state,
            stop,
            handle: Some(handle),
        }
    }

    fn https(tls: Arc<rustls::ServerConfig>) -> Server {
        let mut server = Server::start(Some(tls));
        server.base = server.base.replacen("http://", "https://", 1);
        server
    }

    fn put(&self, path: &str, bytes: &[u8]) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(path.to_string(), bytes.to_vec());
    }

    fn fault(&self, path: &str, fault: Fault) {
        self.state
            .faults
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default()
            .push_back(fault);
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn requests(&self, path: &str) -> Vec<Option<String>> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(stream: TcpStream, state: &State, tls: Option<Arc<rustls::ServerConfig>>) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match tls {
        Some(config) => {
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            respond(&mut tls, state);
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
        None => {
            let mut plain = stream;
            respond(&mut plain, state);
        }
    }
}

fn respond(stream: &mut (impl Read + Write), state: &State) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && request.len() < 16384 {
        match stream.read(&mut byte) {
            Ok(1) => request.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&request).into_owned();
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let range = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("range")
            .then(|| v.trim().to_string())
    });
    state
        .log
        .lock()
        .unwrap()
        .push((path.clone(), range.clone()));
    let fault = state
        .faults
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(|q| q.pop_front());
    let file = state.files.lock().unwrap().get(&path).cloned();
    let html = b"<!DOCTYPE html><html><body>Mirror says hello</body></html>";
    let head = |status: &str, kind: &str, len: usize, extra: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\n{extra}Connection: close\r\n\r\n"
        )
    };
    match (fault, file) {
        (Some(Fault::Html), _) => {
            let _ = stream.write_all(head("200 OK", "text/html", html.len(), "").as_bytes());
            let _ = stream.write_all(html);
        }
        (Some(Fault::HtmlAsOctets), _) => {
            let _ = stream
                .write_all(head("200 OK", "application/octet-stream", html.len(), "").as_bytes());
            let _ = stream.write_all(html);
        }
        (_, None) => {
            let _ = stream.write_all(head("404 Not Found", "text/plain", 0, "").as_bytes());
        }
        (fault, Some(mut body)) => {
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok());
            let total = body.len();
            let header = match start {
                Some(s) if s >= total => {
                    let _ = stream.write_all(
                        head(
                            "416 Range Not Satisfiable",
                            "text/plain",
                            0,
                            &format!("Content-Range: bytes */{total}\r\n"),
                        )
                        .as_bytes(),
                    );
                    return;
                }
                Some(s) => {
                    body.drain(..s);
                    head(
                        "206 Partial Content",
                        "application/octet-stream",
                        body.len(),
                        &format!("Content-Range: bytes {s}-{}/{total}\r\n", total - 1),
                    )
                }
                None => head("200 OK", "application/octet-stream", body.len(), ""),
            };
            let _ = stream.write_all(header.as_bytes());
            if text.starts_with("HEAD ") {
                return;
            }
            match fault {
                Some(Fault::DropAfter(n)) => {
                    let _ = stream.write_all(&body[..n.min(body.len())]);
                }
                Some(Fault::Corrupt(at)) => {
                    if at < body.len() {
                        body[at] ^= 0xff;
                    }
                    let _ = stream.write_all(&body);
                }
                Some(Fault::Hang(d)) => {
                    let _ = stream.flush();
                    std::thread::sleep(d);
                }
                _ => {
                    let _ = stream.write_all(&body);
                }
            }
        }
    }
    let _ = stream.flush();
}

/// Bytes that stand in for an image when only the download is tested.
fn payload() -> Vec<u8> {
    let dir = tmp();
    let path = dir.path().join("payload");
    fill_random(&path, 3 << 20);
    std::fs::read(&path).unwrap()
}

/// A server with `bytes` as ISO_NAME under /pub/ and its CHECKSUM signed by the
/// test key beside it.
fn serving(bytes: &[u8]) -> Server {
    let server = Server::start(None);
    publish(&server, bytes);
    server
}

fn publish(server: &Server, bytes: &[u8]) {
    server.put(&format!("/pub/{ISO_NAME}"), bytes);
    let text = checksum_text(&[(ISO_NAME, &sha256_hex(bytes))], SignedBy::Good);
    server.put(&format!("/pub/{CHECKSUM_NAME}"), text.as_bytes());
}

fn fetch_only(source: &str, dir: &Path, extra: &[&str]) -> Output {
    let keyring = keys().good.to_str().unwrap().to_string();
    let mut args = vec![
        "--json",
        "write",
        source,
        "--download-only",
        "--download-dir",
        dir.to_str().unwrap(),
        "--keyring",
        &keyring,
    ];
    args.extend_from_slice(extra);
    livestick(&args)
}

fn failed(out: &Output, code: i32, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    }
    stderr
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_url_is_downloaded_verified_and_written_then_found_in_the_cache() {
    let iso = std::fs::read(synthetic_iso("fedora-classic.iso")).unwrap();
    let server = serving(&iso);
    let work = tmp();
    let cache = work.path().join("cache");
    let target = work.path().join("stick.img");
    let url = server.url(&format!("/pub/{ISO_NAME}"));
    let out = livestick(&[
        "--json",
        "write",
        &url,
        target.to_str().unwrap(),
        "--size",
        "64M",
        "--download-dir",
        cache.to_str().unwrap(),
        "--keyring",
        keys().good.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(ok(&out).as_bytes()).unwrap();
    let check = &report["checksum"];
    assert_eq!(check["status"], "checked", "{check}");
    assert_eq!(check["matched"], true);
    assert_eq!(check["signed"], true);
    assert_eq!(check["discovered"], true);
    assert_eq!(
        check["file"],
        server.url(&format!("/pub/{CHECKSUM_NAME}")).as_str()
    );
    assert!(
        report["iso_md5"].is_string(),
        "the implanted MD5 is checked too"
    );
    assert_eq!(names_in(&cache), [ISO_NAME]);
    assert_eq!(sha256_file(&cache.join(ISO_NAME)), sha256_hex(&iso));
    let offset = sfdisk(&target)["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512;
    assert!(fat_ls(&target, offset, "/LiveOS").contains("squashfs"));

    // A second run finds the verified file and does not download it again.
    let again = fetch_only(&url, &cache, &[]);
    let json: serde_json::Value = serde_json::from_slice(ok(&again).as_bytes()).unwrap();
    assert_eq!(json["file"], cache.join(ISO_NAME).to_str().unwrap());
    assert_eq!(json["checksum"]["matched"], true);
    assert_eq!(server.requests(&format!("/pub/{ISO_NAME}")).len(), 1);
}

#[test]
fn a_dropped_connection_is_resumed_with_a_range_request() {
    let bytes = payload();
    let server = serving(&bytes);
    let path = format!("/pub/{ISO_NAME}");
    server.fault(&path, Fault::DropAfter(1 << 20));
    let cache = tmp();
    let url = server.url(&path);
    failed(
        &fetch_only(&url, cache.path(), &[]),
        4,
        &[
            "stopped after 1048576 of",
            "run the same command again to resume",
        ],
    );
    assert_eq!(names_in(cache.path()), [format!("{ISO_NAME}.part")]);
    assert_eq!(
        std::fs::metadata(cache.path().join(format!("{ISO_NAME}.part")))
            .unwrap()
            .len(),
        1 << 20
    );
    ok(&fetch_only(&url, cache.path(), &[]));
    assert_eq!(
        server.requests(&path),
        [None, Some("bytes=1048576-".to_string())]
    );
    assert_eq!(names_in(cache.path()), [ISO_NAME]);
    assert_eq!(
        sha256_file(&cache.path().join(ISO_NAME)),
        sha256_hex(&bytes)
    );
}

#[test]
fn a_corrupted_byte_is_caught_and_the_next_run_starts_afresh() {
    let bytes = payload();
    let server = serving(&bytes);
    let path = format!("/pub/{ISO_NAME}");
    server.fault(&path, Fault::Corrupt(123_456));
    let cache = tmp();
    let url = server.url(&path);
    failed(
        &fetch_only(&url, cache.path(), &[]),
        2,
        &["the download is corrupt", &sha256_hex(&bytes)],
    );
    assert!(names_in(cache.path()).is_empty(), "nothing kept");
    ok(&fetch_only(&url, cache.path(), &[]));
    assert_eq!(server.requests(&path), [None, None]);
    assert_eq!(
        sha256_file(&cache.path().join(ISO_NAME)),
        sha256_hex(&bytes)
    );
}

#[test]
fn a_404_or_an_html_page_is_named_and_the_target_is_untouched() {
    let bytes = payload();
    let server = serving(&bytes);
    let work = tmp();
    let target = work.path().join("stick.img");
    fill_random(&target, 1 << 20);
    let before = sha256_file(&target);
    let cache = work.path().join("cache");
    let missing = server.url("/pub/Fedora-Gone-Live-42-1.1.x86_64.iso");
    let out = livestick(&[
        "write",
        &missing,
        target.to_str().unwrap(),
        "--download-dir",
        cache.to_str().unwrap(),
        "--keyring",
        keys().good.to_str().unwrap(),
    ]);
    failed(&out, 2, &["404", "Fedora-Gone"]);
    assert_eq!(sha256_file(&target), before);

    let path = format!("/pub/{ISO_NAME}");
    for fault in [Fault::Html, Fault::HtmlAsOctets] {
        server.fault(&path, fault);
        let out = fetch_only(&server.url(&path), &cache, &[]);
        failed(&out, 2, &["served an HTML page instead of the image"]);
        assert!(!cache.join(ISO_NAME).exists(), "{fault:?}");
    }
    // An HTML page where the CHECKSUM should be.
    server.fault(&format!("/pub/{CHECKSUM_NAME}"), Fault::Html);
    failed(
        &fetch_only(&server.url(&path), &cache, &[]),
        2,
        &["instead of a CHECKSUM file"],
    );
}

#[test]
fn a_server_that_stops_sending_times_out_and_can_be_resumed() {
    let bytes = payload();
    let server = serving(&bytes);
    let path = format!("/pub/{ISO_NAME}");
    server.fault(&path, Fault::Hang(Duration::from_secs(8)));
    let cache = tmp();
    failed(
        &fetch_only(
            &server.url(&path),
            cache.path(),
            &["--download-timeout", "1"],
        ),
        4,
        &["--download-timeout", "resume"],
    );
    ok(&fetch_only(&server.url(&path), cache.path(), &[]));
}

#[test]
fn a_release_name_is_resolved_through_releases_json() {
    let bytes = payload();
    let server = Server::start(None);
    // No CHECKSUM beside it: the index's sha256 is what the download is checked with.
    server.put(&format!("/pub/{ISO_NAME}"), &bytes);
    let index = serde_json::json!([
        {"version": "42", "arch": "x86_64", "variant": "Workstation", "subvariant": "Workstation",
         "link": server.url(&format!("/pub/{ISO_NAME}")), "sha256": sha256_hex(&bytes),
         "size": bytes.len().to_string()},
        {"version": "42", "arch": "x86_64", "variant": "Spins", "subvariant": "KDE",
         "link": server.url("/pub/kde.iso"), "sha256": "00", "size": "1"}
    ]);
    server.put("/releases.json", index.to_string().as_bytes());
    let releases = server.url("/releases.json");
    let cache = tmp();
    let out = fetch_only(
        "fedora:42/workstation/x86_64",
        cache.path(),
        &["--releases-url", &releases],
    );
    let json = crate::support::schema::valid_document(ok(&out).as_bytes(), "download");
    assert_eq!(json["checksum"]["trust"]["kind"], "release-index");
    assert_eq!(json["checksum"]["matched"], true);
    assert_eq!(
        sha256_file(&cache.path().join(ISO_NAME)),
        sha256_hex(&bytes)
    );

    let out = fetch_only(
        "fedora:42/silverblue/x86_64",
        cache.path(),
        &["--releases-url", &releases],
    );
    failed(
        &out,
        2,
        &["has no fedora:42/silverblue/x86_64", "kde, workstation"],
    );
}

#[test]
fn a_url_without_a_checksum_is_refused_unless_allowed() {
    let bytes = payload();
    let server = Server::start(None);
    server.put("/pub/disk.iso", &bytes);
    let cache = tmp();
    let url = server.url("/pub/disk.iso");
    failed(
        &fetch_only(&url, cache.path(), &[]),
        2,
        &["no checksum for", "--allow-unsigned"],
    );
    let out = fetch_only(&url, cache.path(), &["--allow-unsigned"]);
    let json = crate::support::schema::valid_document(ok(&out).as_bytes(), "download");
    assert_eq!(json["checksum"]["status"], "not-checked");
    // --checksum URL names one anyway.
    let sums = format!("{}  disk.iso\n", sha256_hex(&bytes));
    server.put("/pub/SHA256SUMS", sums.as_bytes());
    let cache2 = tmp();
    let out = fetch_only(
        &url,
        cache2.path(),
        &[
            "--checksum",
            &server.url("/pub/SHA256SUMS"),
            "--allow-unsigned",
        ],
    );
    let json = crate::support::schema::valid_document(ok(&out).as_bytes(), "download");
    assert_eq!(json["checksum"]["matched"], true);
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=livestick test CA",
        ],
    );
    sh(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    sh(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.pem"),
            "-days",
            "2",
            "-extfile",
            &p("ext"),
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[test]
fn https_is_trusted_through_ca_file() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let work = tmp();
    let (ca, cert, key) = test_pki(work.path());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let server = Server::https(Arc::new(config));
    let bytes = payload();
    publish(&server, &bytes);
    let url = server.url(&format!("/pub/{ISO_NAME}"));
    let cache = work.path().join("cache");
    failed(&fetch_only(&url, &cache, &[]), 4, &["--ca-file"]);
    let out = fetch_only(&url, &cache, &["--ca-file", ca.to_str().unwrap()]);
    let json = crate::support::schema::valid_document(ok(&out).as_bytes(), "download");
    assert_eq!(json["checksum"]["matched"], true);
    assert_eq!(sha256_file(&cache.join(ISO_NAME)), sha256_hex(&bytes));
}
