//! The packages' metadata is right before anything is built (building them is
//! `packaging/build.sh`, which CI runs after the tests): the RPM spec requires
//! SYSLINUX on x86 only and builds offline from vendored crates; the .deb's
//! relations come from the tool registry, SYSLINUX again on x86 only.

use std::collections::BTreeSet;
use std::process::Command;

use crate::support::*;

fn spec() -> String {
    repo()
        .join("packaging/livestick.spec")
        .display()
        .to_string()
}

fn requires_on(arch: &str) -> BTreeSet<String> {
    let out = checked(Command::new(tool("rpmspec")).args([
        "-q",
        "--requires",
        "--target",
        arch,
        &spec(),
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_rpm_needs_syslinux_on_x86_only_and_builds_offline() {
    if !need("rpmspec") {
        return;
    }
    let x86 = requires_on("x86_64");
    let arm = requires_on("aarch64");
    for pkg in ["syslinux", "syslinux-nonlinux", "mtools", "e2fsprogs"] {
        assert!(x86.contains(pkg), "x86_64 lacks {pkg}: {x86:?}");
    }
    assert!(
        !arm.iter().any(|p| p.starts_with("syslinux")),
        "aarch64 must not require SYSLINUX, which Fedora builds for x86 only: {arm:?}"
    );
    assert!(
        arm.contains("mtools") && arm.contains("e2fsprogs"),
        "{arm:?}"
    );

    let parsed = String::from_utf8_lossy(
        &checked(Command::new(tool("rpmspec")).args(["-P", &spec()])).stdout,
    )
    .into_owned();
    let arches = parsed
        .lines()
        .find_map(|l| l.strip_prefix("ExclusiveArch:"))
        .expect("ExclusiveArch");
    for arch in ["x86_64", "aarch64"] {
        assert!(arches.split_whitespace().any(|a| a == arch), "{arches}");
    }
    assert!(parsed.contains("livestick-0.1.0-vendor.tar.gz"), "{parsed}");
    assert!(
        parsed.contains("cargo build --release --locked --offline"),
        "{parsed}"
    );
    assert!(parsed.contains("replace-with = \"vendored-sources\""));
    // The spec's version is the crate's.
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let version = parsed
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .unwrap()
        .trim();
    assert!(
        cargo.contains(&format!("version = \"{version}\"")),
        "{version}"
    );
}

fn deb_control(arch: &str) -> String {
    let out = checked(
        Command::new("bash")
            .arg(repo().join("packaging/build.sh"))
            .args(["--control", arch])
            .env("LIVESTICK", bin()),
    );
    String::from_utf8(out.stdout).unwrap()
}

fn field(control: &str, name: &str) -> BTreeSet<String> {
    control
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_default()
        .split(", ")
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_deb_relations_come_from_the_tool_registry() {
    let amd64 = deb_control("amd64");
    let depends = field(&amd64, "Depends");
    let recommends = field(&amd64, "Recommends");
    let suggests = field(&amd64, "Suggests");
    for pkg in ["syslinux", "syslinux-common", "mtools"] {
        assert!(depends.contains(pkg), "{amd64}");
    }
    for pkg in [
        "e2fsprogs",
        "squashfs-tools",
        "squashfs-tools-ng",
        "erofs-utils",
        "fakeroot",
    ] {
        assert!(recommends.contains(pkg), "{amd64}");
    }
    assert!(suggests.contains("cryptsetup-bin"), "{amd64}");
    assert!(!suggests.contains("qemu-system-x86"), "{amd64}");
    // Every Debian package doctor names is in exactly one field.
    let doctor: serde_json::Value =
        serde_json::from_str(&ok(&livestick(&["doctor", "--json"]))).unwrap();
    for check in doctor["checks"].as_array().unwrap() {
        // Services, and QEMU/OVMF for the boot tests, are no packages of the tool's.
        if check["kind"] == "service"
            || check["feature"]
                .as_str()
                .is_some_and(|f| f.starts_with("boot tests"))
        {
            continue;
        }
        let pkg = check["debian"].as_str().unwrap();
        let places = [&depends, &recommends, &suggests]
            .iter()
            .filter(|f| f.contains(pkg))
            .count();
        assert_eq!(places, 1, "{pkg} in {places} fields:\n{amd64}");
    }
    assert!(amd64.contains("Architecture: amd64"));
    assert!(amd64.contains("Version: 0.1.0-1"), "{amd64}");

    let arm64 = deb_control("arm64");
    assert!(
        !field(&arm64, "Depends")
            .iter()
            .chain(&field(&arm64, "Recommends"))
            .any(|p| p.starts_with("syslinux")),
        "SYSLINUX is x86 only:\n{arm64}"
    );
    assert!(field(&arm64, "Depends").contains("mtools"), "{arm64}");
}
