//! `cargo xtask images`: the container images the tests and examples run, built here from
//! the project's own binaries and Debian's busybox-static, since no registry is reachable.
//! Each image is an OCI image layout in a tar (what `ctr images import` and `weir image
//! import` take), under `target/images/`, named by the `io.containerd.image.name`
//! annotation:
//!
//! - `weir.local/busybox:latest` (`busybox.tar`): busybox-static with every applet linked in
//!   /bin; `sh` by default.
//! - `weir.local/echo:latest` (`echo.tar`): the same plus `weir-echo` (images/echo), an
//!   HTTP server on 8080 that answers with its pod name and IP.
//!
//! Builds are reproducible: entries sorted, owners root, times 0, so an unchanged input
//! gives the same digests.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::command::{self, status};
use crate::setup;
use crate::workspace::Workspace;

const BUSYBOX: &str = "/bin/busybox";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One file system entry of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir { path: String, mode: u32 },
    File { path: String, mode: u32, data: Vec<u8> },
    Symlink { path: String, target: String },
}

impl Entry {
    fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Symlink { path, .. } => path,
        }
    }
}

/// What an image is made of and how it starts.
pub struct ImageSpec {
    /// `io.containerd.image.name`, e.g. `weir.local/busybox:latest`.
    pub name: String,
    pub entries: Vec<Entry>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Vec<String>,
    pub exposed_ports: Vec<String>,
}

/// Builds every image into `target/images/` and returns the tarballs.
pub fn run(ws: &Workspace) -> Result<Vec<PathBuf>> {
    setup::debian_packages()?;
    let out = ws.target.join("images");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let busybox = busybox_entries()?;

    status("images: building weir-echo (release, statically linked)");
    let build_dir = ws.target.join("images-build");
    command::run(
        "images: cargo build -p weir-echo",
        ws.cargo()
            .args([
                "build",
                "--release",
                "-p",
                "weir-echo",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .arg("--target-dir")
            .arg(&build_dir)
            // A separate target dir: these flags would otherwise rebuild the workspace's.
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
        "check that the stable toolchain builds images/echo",
    )?;
    let echo_binary = build_dir.join("x86_64-unknown-linux-gnu/release/weir-echo");
    let echo = std::fs::read(&echo_binary).with_context(|| format!("reading {}", echo_binary.display()))?;

    let mut echo_entries = busybox.clone();
    echo_entries.extend([
        Entry::Dir {
            path: "usr/local".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "usr/local/bin".into(),
            mode: 0o755,
        },
        Entry::File {
            path: "usr/local/bin/weir-echo".into(),
            mode: 0o755,
            data: echo,
        },
    ]);
    let images = [
        (
            "busybox.tar",
            ImageSpec {
                name: "weir.local/busybox:latest".into(),
                entries: busybox,
                entrypoint: None,
                cmd: vec!["sh".into()],
                exposed_ports: Vec::new(),
            },
        ),
        (
            "echo.tar",
            ImageSpec {
                name: "weir.local/echo:latest".into(),
                entries: echo_entries,
                entrypoint: Some(vec!["/usr/local/bin/weir-echo".into()]),
                cmd: vec!["8080".into()],
                exposed_ports: vec!["8080/tcp".into()],
            },
        ),
    ];
    let mut written = Vec::new();
    for (file, spec) in images {
        let path = out.join(file);
        let tarball = oci_archive(&spec)?;
        std::fs::write(&path, &tarball).with_context(|| format!("writing {}", path.display()))?;
        status(format!(
            "images: {} -> {} ({} KiB)",
            spec.name,
            path.display(),
            tarball.len() / 1024
        ));
        written.push(path);
    }
    Ok(written)
}

/// busybox-static's binary with a /bin link per applet, and the few files a shell image
/// needs (/etc/passwd, /etc/group, /tmp).
fn busybox_entries() -> Result<Vec<Entry>> {
    let binary = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX}: `cargo xtask setup` installs the package busybox-static"))?;
    let list = command::output(
        "images: busybox --list",
        Command::new(BUSYBOX).arg("--list"),
        "reinstall busybox-static",
    )?;
    let mut entries = base_entries();
    entries.push(Entry::File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data: binary,
    });
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox") {
        if applet.contains('/') {
            bail!("busybox --list printed {applet:?}, not an applet name");
        }
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    Ok(entries)
}

fn base_entries() -> Vec<Entry> {
    let dir = |path: &str, mode| Entry::Dir {
        path: path.into(),
        mode,
    };
    let file = |path: &str, data: &str| Entry::File {
        path: path.into(),
        mode: 0o644,
        data: data.as_bytes().to_vec(),
    };
    vec![
        dir("bin", 0o755),
        dir("etc", 0o755),
        dir("root", 0o700),
        dir("tmp", 0o1777),
        dir("usr", 0o755),
        dir("var", 0o755),
        file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ]
}

/// A layer tar: parents before children, sorted, root-owned, time 0.
pub fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path().cmp(b.path()));
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].path() == pair[1].path()) {
        bail!("the layer has {} twice", pair[0].path());
    }
    let mut builder = tar::Builder::new(Vec::new());
    for entry in sorted {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match entry {
            Entry::Dir { path, mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { path, mode, data } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The OCI image layout of `spec` (one gzip layer), as a tar.
pub fn oci_archive(spec: &ImageSpec) -> Result<Vec<u8>> {
    let layer = layer_tar(&spec.entries)?;
    let diff_id = sha256(&layer);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&layer)?;
    let layer_gz = gz.finish()?;

    let mut container_config = json!({
        "Env": [PATH_ENV],
        "Cmd": spec.cmd,
        "WorkingDir": "/",
    });
    if let Some(entrypoint) = &spec.entrypoint {
        container_config["Entrypoint"] = json!(entrypoint);
    }
    if !spec.exposed_ports.is_empty() {
        let ports: serde_json::Map<String, serde_json::Value> =
            spec.exposed_ports.iter().map(|p| (p.clone(), json!({}))).collect();
        container_config["ExposedPorts"] = json!(ports);
    }
    // The three documents are small and fixed; serde_json writes them as the OCI image
    // spec (v1.1) describes.
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask images"}],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha256(&layer_gz),
            "size": layer_gz.len(),
        }],
    }))?;
    let tag = spec.name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let mut blobs = vec![
        ("oci-layout".to_owned(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json".to_owned(), index),
    ];
    for blob in [config, manifest, layer_gz] {
        let name = format!("blobs/sha256/{}", &sha256(&blob)["sha256:".len()..]);
        blobs.push((name, blob));
    }
    let mut entries = vec![
        Entry::Dir {
            path: "blobs".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "blobs/sha256".into(),
            mode: 0o755,
        },
    ];
    entries.extend(blobs.into_iter().map(|(path, data)| Entry::File {
        path,
        mode: 0o644,
        data,
    }));
    layer_tar(&entries)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Read as _;

    use super::*;

    fn read_tar(data: &[u8]) -> HashMap<String, (tar::EntryType, Vec<u8>, Option<String>)> {
        let mut archive = tar::Archive::new(data);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned();
                let link = entry.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
                let kind = entry.header().entry_type();
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                (path, (kind, data, link))
            })
            .collect()
    }

    fn spec() -> ImageSpec {
        let mut entries = base_entries();
        entries.push(Entry::File {
            path: "bin/hello".into(),
            mode: 0o755,
            data: b"#!/bin/sh\necho hi\n".to_vec(),
        });
        entries.push(Entry::Symlink {
            path: "bin/hi".into(),
            target: "hello".into(),
        });
        ImageSpec {
            name: "weir.local/test:v1".into(),
            entries,
            entrypoint: Some(vec!["/bin/hello".into()]),
            cmd: vec![],
            exposed_ports: vec!["8080/tcp".into()],
        }
    }

    #[test]
    fn the_archive_is_an_oci_layout_whose_digests_and_sizes_hold() {
        let archive = oci_archive(&spec()).unwrap();
        let files = read_tar(&archive);
        let blob = |digest: &str| -> Vec<u8> {
            let data = &files[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))].1;
            assert_eq!(sha256(data), digest, "a blob's name must be its digest");
            data.clone()
        };
        assert_eq!(files["oci-layout"].1, br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"].1).unwrap();
        let descriptor = &index["manifests"][0];
        assert_eq!(
            descriptor["annotations"]["io.containerd.image.name"],
            "weir.local/test:v1"
        );
        assert_eq!(descriptor["annotations"]["org.opencontainers.image.ref.name"], "v1");
        let manifest_bytes = blob(descriptor["digest"].as_str().unwrap());
        assert_eq!(descriptor["size"], manifest_bytes.len());
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
        let config_bytes = blob(manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/bin/hello");
        assert!(config["config"]["ExposedPorts"].get("8080/tcp").is_some());

        let layer_gz = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        let mut layer = Vec::new();
        flate2::read::GzDecoder::new(layer_gz.as_slice())
            .read_to_end(&mut layer)
            .unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            sha256(&layer),
            "diff_id = digest of the plain layer"
        );
        let rootfs = read_tar(&layer);
        assert_eq!(rootfs["bin/hello"].1, b"#!/bin/sh\necho hi\n");
        assert_eq!(rootfs["bin/hi"].0, tar::EntryType::Symlink);
        assert_eq!(rootfs["bin/hi"].2.as_deref(), Some("hello"));
        assert_eq!(rootfs["tmp"].0, tar::EntryType::Directory);
    }

    #[test]
    fn builds_are_reproducible_and_duplicates_refused() {
        assert_eq!(oci_archive(&spec()).unwrap(), oci_archive(&spec()).unwrap());
        let mut twice = spec();
        twice.entries.push(Entry::Dir {
            path: "tmp".into(),
            mode: 0o755,
        });
        let err = oci_archive(&twice).unwrap_err();
        assert!(err.to_string().contains("tmp twice"), "{err}");
    }
}
