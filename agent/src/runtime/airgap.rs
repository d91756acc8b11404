//! Air-gapped nodes: images arrive as tarballs (OCI archives or `docker save` output,
//! gzipped or not), either dropped into `<data-dir>/images/` (for the agent to import at
//! start with [`import_directory`]) or imported by hand with `weir image import FILE...`
//! ([`ImageCommand`]) into the running agent's containerd.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

use super::{ContainerdConfig, DEFAULT_NAMESPACE, Error, Runtime};

/// Where an agent with data directory `data_dir` looks for image tarballs.
pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

/// What [`import_directory`] did, file by file.
#[derive(Debug, Default)]
pub struct DirectoryImport {
    /// Each archive imported and the images it held.
    pub imported: Vec<(PathBuf, Vec<String>)>,
    /// Each archive that could not be imported, and why.
    pub failed: Vec<(PathBuf, Error)>,
}

impl DirectoryImport {
    /// The names of every image imported.
    pub fn images(&self) -> Vec<String> {
        self.imported
            .iter()
            .flat_map(|(_, names)| names.iter().cloned())
            .collect()
    }
}

/// Whether a file name is one of the archives [`Runtime::import_archive`] reads.
fn is_archive(name: &str) -> bool {
    name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Imports every `*.tar`, `*.tar.gz` and `*.tgz` file in `dir` (not its subdirectories),
/// in name order. A file that fails is reported in [`DirectoryImport::failed`] (and
/// logged) and the rest are still imported. A missing directory imports nothing; an
/// unreadable one is an error.
pub async fn import_directory(runtime: &Runtime, dir: &Path) -> Result<DirectoryImport, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirectoryImport::default()),
        Err(e) => return Err(Error::io(format!("reading the images directory {}", dir.display()), e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading the images directory {}", dir.display()), e))?;
        let path = entry.path();
        let archive = path.file_name().and_then(|n| n.to_str()).is_some_and(is_archive);
        // `metadata` follows symbolic links: a link to an archive elsewhere is imported too.
        if archive && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    let mut report = DirectoryImport::default();
    for path in files {
        match runtime.import_archive(&path).await {
            Ok(names) => report.imported.push((path, names)),
            Err(error) => {
                warn!(archive = %path.display(), %error, "could not import the image archive; skipping it");
                report.failed.push((path, error));
            }
        }
    }
    info!(
        dir = %dir.display(),
        imported = report.imported.len(),
        failed = report.failed.len(),
        "imported the images directory"
    );
    Ok(report)
}

/// Where `weir image` finds the node's containerd.
#[derive(clap::Args, Clone, Debug)]
pub struct ContainerdTarget {
    /// The agent's data directory: its containerd listens on `<data-dir>/containerd/containerd.sock`.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "/var/lib/weir")]
    pub data_dir: PathBuf,
    /// The containerd socket, when the agent uses an existing containerd (its `--containerd-socket`).
    #[arg(long)]
    pub containerd_socket: Option<PathBuf>,
    /// The containerd namespace the agent keeps its images in.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl ContainerdTarget {
    /// The socket: `--containerd-socket`, or the agent's managed containerd's.
    pub fn socket(&self) -> PathBuf {
        let mut config = ContainerdConfig::managed(self.data_dir.join("containerd"));
        config.existing_socket = self.containerd_socket.clone();
        config.socket()
    }

    async fn connect(&self) -> anyhow::Result<Runtime> {
        let socket = self.socket();
        if !socket.exists() {
            bail!(
                "no containerd socket at {}: is the agent running with --data-dir {}? (or pass --containerd-socket)",
                socket.display(),
                self.data_dir.display()
            );
        }
        Runtime::connect(&socket, &self.namespace)
            .await
            .with_context(|| format!("connecting to containerd at {}", socket.display()))
    }
}

/// `weir image`: the node's images, for air-gapped nodes and checks.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum ImageCommand {
    /// Import image tarballs (OCI archives or `docker save` output, gzipped or not) into
    /// the node's containerd, where pods find them.
    Import {
        #[command(flatten)]
        target: ContainerdTarget,
        /// The tarballs.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the images on the node.
    Ls {
        #[command(flatten)]
        target: ContainerdTarget,
    },
}

impl ImageCommand {
    /// Runs the command, printing to stdout; fails when any file failed (after trying all).
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            ImageCommand::Import { target, files } => {
                let runtime = target.connect().await?;
                let mut failed = 0;
                for file in &files {
                    match runtime.import_archive(file).await {
                        Ok(names) => {
                            for name in names {
                                println!("imported {name} from {}", file.display());
                            }
                        }
                        Err(e) => {
                            eprintln!("error: {}: {e}", file.display());
                            failed += 1;
                        }
                    }
                }
                if failed > 0 {
                    bail!("{failed} of {} archives could not be imported", files.len());
                }
                Ok(())
            }
            ImageCommand::Ls { target } => {
                let runtime = target.connect().await?;
                for name in runtime.list_images().await? {
                    println!("{name}");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_by_name() {
        for name in ["busybox.tar", "app.tar.gz", "app.tgz"] {
            assert!(is_archive(name), "{name}");
        }
        for name in ["notes.txt", "app.tar.zst", "tar", "app.gz"] {
            assert!(!is_archive(name), "{name}");
        }
    }

    #[test]
    fn the_socket_is_the_managed_containerds_unless_given() {
        let target = ContainerdTarget {
            data_dir: "/var/lib/weir".into(),
            containerd_socket: None,
            namespace: DEFAULT_NAMESPACE.into(),
        };
        assert_eq!(target.socket(), Path::new("/var/lib/weir/containerd/containerd.sock"));
        let target = ContainerdTarget {
            containerd_socket: Some("/run/containerd/containerd.sock".into()),
            ..target
        };
        assert_eq!(target.socket(), Path::new("/run/containerd/containerd.sock"));
    }
}
