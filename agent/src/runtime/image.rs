//! Images in containerd: importing OCI archives and `docker save` tarballs into the content
//! store, the image records, and unpacking layers into the overlayfs snapshotter through
//! the diff service so containers can start from them; [`Runtime::ensure_image`] finds an
//! image on the node. Import and registry pulls (`pull.rs`) share the storing: blobs into
//! the content store, image records and unpacking ([`Runtime::store_image`]), with the
//! blobs' bytes from a [`BlobSource`] (an archive here, a registry there).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    GetImageRequest, Image as ImageRecord, InfoRequest, ListImagesRequest, ReadContentRequest, UpdateImageRequest,
    UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor;
use futures::StreamExt as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tracing::info;

use super::{Error, Runtime, SNAPSHOTTER};

pub(super) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(super) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The annotation `ctr images export` and `cargo xtask images` name an image by.
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";
const OCI_REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Blobs go to containerd in pieces below its 16 MiB gRPC message limit.
pub(super) const WRITE_CHUNK: usize = 1 << 20;

/// What an image says a container runs when the pod does not say otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// ENV, `NAME=value`.
    pub env: Vec<String>,
    /// WORKDIR; empty for none.
    pub working_dir: String,
    /// USER; empty for none.
    pub user: String,
}

/// An image present on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The full reference, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// The digest of the image record's target (manifest or index).
    pub digest: String,
    /// The chain ID of the top layer: the snapshot a container's root file system starts from.
    pub chain_id: String,
    /// ENTRYPOINT, CMD, ENV, WORKDIR, USER.
    pub defaults: ImageDefaults,
}

/// The parts of OCI and Docker JSON documents the importer reads. Written here rather than
/// taken from `oci-spec`'s image types because one set must read OCI indexes and manifests,
/// Docker's manifest lists and schema-2 manifests, and Docker `save`'s manifest.json, and
/// oci-spec's validating types reject the Docker variants.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub(super) struct Desc {
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: i64,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub(super) annotations: HashMap<String, String>,
    #[serde(default, skip_serializing)]
    pub(super) platform: Option<Platform>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub(super) struct Platform {
    #[serde(default)]
    pub(super) architecture: String,
    #[serde(default)]
    pub(super) os: String,
}

#[derive(Deserialize)]
pub(super) struct Index {
    #[serde(default)]
    pub(super) manifests: Vec<Desc>,
}

#[derive(Deserialize)]
pub(super) struct Manifest {
    pub(super) config: Desc,
    #[serde(default)]
    pub(super) layers: Vec<Desc>,
}

#[derive(Deserialize, Default)]
struct ImageConfigFile {
    #[serde(default)]
    config: Option<ContainerDefaults>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerDefaults {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// One entry of `docker save`'s manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Where one blob's bytes are: made in memory (a Docker manifest, a config read whole), or
/// at a location of the [`BlobSource`] the image comes from.
pub(super) enum Source<L> {
    /// Bytes already in memory.
    Memory(Vec<u8>),
    /// A location in the image's source (a region of an archive; a digest in a registry).
    At(L),
}

/// A region of an archive file: where a member's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Region {
    offset: u64,
    size: u64,
}

/// A blob's bytes, in pieces of at most [`WRITE_CHUNK`], produced as the content store
/// write pulls them; an error ends the blob.
pub(super) type Chunks = futures::stream::BoxStream<'static, Result<Vec<u8>, Error>>;

/// Where the blobs of an image being stored come from: an archive on disk (import) or a
/// registry (pull). Asked only for the blobs the content store lacks.
pub(super) trait BlobSource: Sync {
    /// Where a blob is in this source.
    type Location: Sync;

    /// The bytes of blob `desc`, found at `location`.
    fn open(&self, desc: &Desc, location: &Self::Location) -> impl Future<Output = Result<Chunks, Error>> + Send;
}

/// A tar archive opened for random access: each member's offset and size, read once.
struct Archive {
    path: PathBuf,
    file: File,
    members: HashMap<String, (u64, u64)>,
    /// A decompressed copy of a gzipped archive, removed on drop.
    temporary: Option<PathBuf>,
}

impl Drop for Archive {
    fn drop(&mut self) {
        if let Some(temporary) = &self.temporary {
            let _ = std::fs::remove_file(temporary);
        }
    }
}

impl Archive {
    fn open(path: &Path) -> Result<Archive, Error> {
        let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", path.display()), e);
        let mut file = File::open(path).map_err(|e| io("opening", e))?;
        let mut magic = [0u8; 2];
        let gzipped = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
        let mut temporary = None;
        if gzipped {
            // Members of a compressed tar cannot be read at an offset; decompress it once.
            let out = std::env::temp_dir().join(format!(
                "weir-import-{}-{}.tar",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            ));
            let mut decoder = flate2::read::GzDecoder::new(File::open(path).map_err(|e| io("opening", e))?);
            let mut target = File::create(&out).map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
            std::io::copy(&mut decoder, &mut target).map_err(|e| io("decompressing", e))?;
            file = File::open(&out).map_err(|e| Error::io(format!("opening {}", out.display()), e))?;
            temporary = Some(out);
        }
        let mut members = HashMap::new();
        {
            // A fresh handle: a clone would share the offset the magic check moved.
            let reader = match &temporary {
                Some(out) => File::open(out),
                None => File::open(path),
            }
            .map_err(|e| io("opening", e))?;
            let mut tar = tar::Archive::new(reader);
            let not_tar = |e: std::io::Error| {
                Error::Archive(format!(
                    "{} is not a complete tar archive ({e}): give an OCI image archive or `docker save` output, \
                     gzipped or not",
                    path.display()
                ))
            };
            for entry in tar.entries().map_err(not_tar)? {
                let entry = entry.map_err(not_tar)?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = entry.path().map_err(|e| io("reading a tar entry name of", e))?;
                let name = name.to_string_lossy().trim_start_matches("./").to_string();
                members.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
        Ok(Archive {
            path: path.to_path_buf(),
            file,
            members,
            temporary,
        })
    }

    /// Where a member's bytes are in the (uncompressed) file.
    fn region(&self, member: &str) -> Result<Region, Error> {
        let member = member.trim_start_matches("./");
        let (offset, size) = self.members.get(member).copied().ok_or_else(|| {
            Error::Archive(format!(
                "{} has no member {member}: the archive is incomplete; export the image again",
                self.path.display()
            ))
        })?;
        Ok(Region { offset, size })
    }

    fn read(&self, member: &str) -> Result<Vec<u8>, Error> {
        self.read_region(self.region(member)?)
    }

    fn read_region(&self, region: Region) -> Result<Vec<u8>, Error> {
        self.read_at(region.offset, region.size as usize)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
        Ok(buf)
    }

    /// Where blob `digest` is in an OCI layout (`blobs/<algorithm>/<hex>`).
    fn blob(&self, digest: &str) -> Result<Region, Error> {
        let (algorithm, hex) = digest
            .split_once(':')
            .ok_or_else(|| Error::Archive(format!("{digest:?} is not a digest (algorithm:hex)")))?;
        self.region(&format!("blobs/{algorithm}/{hex}"))
    }

    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, Error> {
        self.read_region(self.blob(digest)?)
    }

    /// sha256 of a member, streamed.
    fn digest_of(&self, region: Region) -> Result<String, Error> {
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        while done < region.size {
            let len = (region.size - done).min(WRITE_CHUNK as u64) as usize;
            hasher.update(self.read_at(region.offset + done, len)?);
            done += len as u64;
        }
        Ok(format!("sha256:{:x}", hasher.finalize()))
    }
}

impl BlobSource for Archive {
    type Location = Region;

    /// The region read in [`WRITE_CHUNK`] pieces as the write pulls them, so a large layer
    /// never sits in memory whole.
    async fn open(&self, desc: &Desc, region: &Region) -> Result<Chunks, Error> {
        if region.size != desc.size as u64 {
            return Err(Error::Archive(format!(
                "blob {} is {} bytes in the archive but its descriptor says {}; the archive is damaged",
                desc.digest, region.size, desc.size
            )));
        }
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
        let (path, digest, region) = (self.path.clone(), desc.digest.clone(), *region);
        let chunks = region.size.div_ceil(WRITE_CHUNK as u64);
        Ok(Box::pin(futures::stream::iter(0..chunks).map(move |i| {
            let offset = i * WRITE_CHUNK as u64;
            let len = (region.size - offset).min(WRITE_CHUNK as u64) as usize;
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, region.offset + offset).map_err(|e| {
                Error::Archive(format!(
                    "reading blob {digest} from the archive {}: {e}",
                    path.display()
                ))
            })?;
            Ok(buf)
        })))
    }
}

/// An image ready to be stored: its names, manifest, config and layers, the blobs at
/// locations of type `L` in their [`BlobSource`].
pub(super) struct Plan<L> {
    pub(super) names: Vec<String>,
    pub(super) manifest: (Desc, Source<L>),
    pub(super) config: (Desc, Vec<u8>),
    pub(super) layers: Vec<(Desc, Source<L>)>,
}

/// `docker.io/library/busybox:latest` from `busybox`, as Docker and containerd normalise
/// references: no domain means docker.io, a single docker.io path component gets
/// `library/`, no tag or digest means `:latest`.
pub fn normalize_reference(reference: &str) -> Result<String, Error> {
    let reference = reference.trim();
    if reference.is_empty() || reference.contains(char::is_whitespace) {
        return Err(Error::InvalidImageName(format!(
            "{reference:?} is not an image reference (like busybox, weir.local/echo:latest)"
        )));
    }
    let (domain, rest) = match reference.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (first.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), reference.to_string()),
    };
    if rest.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(Error::InvalidImageName(format!(
            "{reference:?} is not an image reference: repository names are lower case"
        )));
    }
    let rest = if domain == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest
    };
    let last = rest.rsplit('/').next().unwrap_or(&rest);
    let tagged = last.contains(':') || rest.contains('@');
    Ok(if tagged {
        format!("{domain}/{rest}")
    } else {
        format!("{domain}/{rest}:latest")
    })
}

/// The chain IDs of a layer stack (OCI image spec: the first is the first diff ID; each
/// next is sha256 of `"<previous chain ID> <diff ID>"`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => format!("sha256:{:x}", Sha256::digest(format!("{parent} {diff_id}").as_bytes())),
        };
        out.push(next);
    }
    out
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(what: &str, data: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(data).map_err(|e| Error::Archive(format!("{what} is not valid JSON of its kind: {e}")))
}

/// The OCI name of this machine's architecture (`GOARCH` spelling, as image indexes use).
pub(super) fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// From an index, the manifest for linux on this machine's architecture.
pub(super) fn pick_platform(index: &Index, what: &str) -> Result<Desc, Error> {
    pick_platform_for(index, what, host_architecture())
}

/// From an index, the first manifest for linux/`architecture`; an index of one manifest
/// that names no platform is taken as it is (`ctr images export` writes such indexes).
fn pick_platform_for(index: &Index, what: &str, architecture: &str) -> Result<Desc, Error> {
    let manifests: Vec<&Desc> = index
        .manifests
        .iter()
        .filter(|m| m.media_type == OCI_MANIFEST || m.media_type == DOCKER_MANIFEST)
        .collect();
    let host = manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == architecture)
    });
    match (host, manifests.as_slice()) {
        (Some(m), _) => Ok((*m).clone()),
        (None, [only]) if only.platform.is_none() => Ok((*only).clone()),
        _ => {
            let offered: Vec<String> = manifests
                .iter()
                .filter_map(|m| m.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)))
                .collect();
            Err(Error::Archive(format!(
                "{what} has no manifest for linux/{architecture} (it has: {}): build or export the image for this \
                 platform",
                if offered.is_empty() {
                    "none with a platform".to_string()
                } else {
                    offered.join(", ")
                }
            )))
        }
    }
}

fn defaults_of(config: &ImageConfigFile) -> ImageDefaults {
    let c = config.config.as_ref();
    ImageDefaults {
        entrypoint: c.and_then(|c| c.entrypoint.clone()).unwrap_or_default(),
        cmd: c.and_then(|c| c.cmd.clone()).unwrap_or_default(),
        env: c.and_then(|c| c.env.clone()).unwrap_or_default(),
        working_dir: c.and_then(|c| c.working_dir.clone()).unwrap_or_default(),
        user: c.and_then(|c| c.user.clone()).unwrap_or_default(),
    }
}

fn to_descriptor(d: &Desc) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone(),
    }
}

impl Runtime {
    /// Imports every image of an OCI image archive (`index.json`, named by the
    /// `io.containerd.image.name` annotation or a full `org.opencontainers.image.ref.name`)
    /// or a `docker save` tarball (`manifest.json`, named by RepoTags), gzipped or not, and
    /// unpacks them so containers can start. Returns the image names.
    pub async fn import_archive(&self, path: &Path) -> Result<Vec<String>, Error> {
        let archive = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || Archive::open(&path))
                .await
                .map_err(|e| Error::Archive(format!("reading the archive panicked: {e}")))??
        };
        let plans = if archive.members.contains_key("index.json") {
            match oci_plans(&archive) {
                Err(Error::Archive(_)) if archive.members.contains_key("manifest.json") => docker_plans(&archive)?,
                other => other?,
            }
        } else if archive.members.contains_key("manifest.json") {
            docker_plans(&archive)?
        } else {
            return Err(Error::Archive(format!(
                "{} is neither an OCI image archive (index.json) nor a `docker save` tarball (manifest.json)",
                path.display()
            )));
        };
        let lease = self.create_lease().await?;
        let mut names = Vec::new();
        let mut result = Ok(());
        for plan in plans {
            match self.store_image(&archive, &lease, &plan).await {
                Ok(()) => names.extend(plan.names.iter().cloned()),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.delete_lease(&lease).await;
        result?;
        info!(archive = %path.display(), images = ?names, "imported images");
        Ok(names)
    }

    /// Stores one image: writes its layers, config and manifest into the content store
    /// (each only if missing) with the labels that keep them from garbage collection,
    /// unpacks the layers, and points the image records at the manifest. Shared by import
    /// and pull; `source` supplies the blobs the content store lacks.
    pub(super) async fn store_image<S: BlobSource>(
        &self,
        source: &S,
        lease: &str,
        plan: &Plan<S::Location>,
    ) -> Result<(), Error> {
        let config: ImageConfigFile = parse_json("the image config", &plan.config.1)?;
        let diff_ids = config.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
        if diff_ids.len() != plan.layers.len() {
            return Err(Error::Archive(format!(
                "image {}: the config lists {} diff IDs for {} layers; the image is damaged (export or push it \
                 again)",
                plan.names.join(", "),
                diff_ids.len(),
                plan.layers.len()
            )));
        }
        let chains = chain_ids(&diff_ids);
        for ((desc, blob), diff_id) in plan.layers.iter().zip(&diff_ids) {
            let labels = HashMap::from([("containerd.io/uncompressed".to_string(), diff_id.clone())]);
            self.write_blob(source, lease, desc, blob, labels).await?;
        }
        let mut config_labels = HashMap::new();
        if let Some(top) = chains.last() {
            config_labels.insert(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top.clone());
        }
        self.write_blob(
            source,
            lease,
            &plan.config.0,
            &Source::Memory(plan.config.1.clone()),
            config_labels,
        )
        .await?;
        let mut manifest_labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            plan.config.0.digest.clone(),
        )]);
        for (i, (layer, _)) in plan.layers.iter().enumerate() {
            manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), layer.digest.clone());
        }
        self.write_blob(source, lease, &plan.manifest.0, &plan.manifest.1, manifest_labels)
            .await?;
        let layers: Vec<Desc> = plan.layers.iter().map(|(d, _)| d.clone()).collect();
        self.unpack(Some(lease), &layers, &diff_ids).await?;
        for name in &plan.names {
            self.put_image_record(name, &plan.manifest.0).await?;
        }
        Ok(())
    }

    /// Creates or replaces the image record `name` → `target`.
    pub(super) async fn put_image_record(&self, name: &str, target: &Desc) -> Result<(), Error> {
        let image = ImageRecord {
            name: name.to_string(),
            target: Some(to_descriptor(target)),
            ..Default::default()
        };
        let mut images = ImagesClient::new(self.channel());
        let created = images
            .create(self.request(CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            }))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => images
                .update(self.request(UpdateImageRequest {
                    image: Some(image),
                    ..Default::default()
                }))
                .await
                .map(|_| ())
                .map_err(Error::rpc("updating the image record")),
            Err(status) => Err(Error::rpc("creating the image record")(status)),
        }
    }

    /// Writes one blob into the content store unless it is there already; either way the
    /// blob ends up with `labels` (garbage-collection references to its children). Only a
    /// missing blob is opened in `source` (a pull downloads only what the node lacks).
    async fn write_blob<S: BlobSource>(
        &self,
        source: &S,
        lease: &str,
        desc: &Desc,
        blob: &Source<S::Location>,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        let mut content = ContentClient::new(self.channel());
        let existing = content
            .info(self.request(InfoRequest {
                digest: desc.digest.clone(),
            }))
            .await;
        match existing {
            Ok(_) => {
                if labels.is_empty() {
                    return Ok(());
                }
                let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
                content
                    .update(self.request(UpdateContentRequest {
                        info: Some(containerd_client::services::v1::Info {
                            digest: desc.digest.clone(),
                            labels,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask { paths }),
                    }))
                    .await
                    .map_err(Error::rpc("labelling a blob in the content store"))?;
                return Ok(());
            }
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(Error::rpc("looking up a blob in the content store")(status)),
        }
        let chunks: Chunks = match blob {
            Source::Memory(data) => {
                if data.len() as u64 != desc.size as u64 {
                    return Err(Error::Archive(format!(
                        "blob {} is {} bytes but its descriptor says {}; the image is damaged",
                        desc.digest,
                        data.len(),
                        desc.size
                    )));
                }
                let pieces: Vec<Result<Vec<u8>, Error>> = data.chunks(WRITE_CHUNK).map(|c| Ok(c.to_vec())).collect();
                Box::pin(futures::stream::iter(pieces))
            }
            Source::At(location) => source.open(desc, location).await?,
        };
        // One Write request per chunk at its offset, then a Commit (containerd checks size
        // and digest). A source error ends the stream early and is reported below.
        // A ref of its own per write: containerd locks a ref while it is written, and two imports
        // of the same blob at once must not fail on each other's lock (the second commit finds
        // the blob there and says AlreadyExists, which is success).
        let reference = format!("weir-import-{}-{}", desc.digest, unique_suffix());
        let read_error = std::sync::Arc::new(std::sync::Mutex::new(None::<Error>));
        let requests = {
            let read_error = read_error.clone();
            let (total, expected) = (desc.size, desc.digest.clone());
            futures::stream::unfold(Some((chunks, 0i64)), move |state| {
                let read_error = read_error.clone();
                let (reference, expected, labels) = (reference.clone(), expected.clone(), labels.clone());
                async move {
                    let (mut chunks, offset) = state?;
                    let request = |action: WriteAction, data: Vec<u8>, labels| WriteContentRequest {
                        action: action as i32,
                        r#ref: reference,
                        total,
                        expected,
                        offset,
                        data,
                        labels,
                    };
                    match chunks.next().await {
                        Some(Ok(data)) => {
                            let next = offset + data.len() as i64;
                            Some((request(WriteAction::Write, data, HashMap::new()), Some((chunks, next))))
                        }
                        Some(Err(e)) => {
                            if let Ok(mut slot) = read_error.lock() {
                                *slot = Some(e);
                            }
                            None
                        }
                        None => Some((request(WriteAction::Commit, Vec::new(), labels), None)),
                    }
                }
            })
        };
        let mut stream = content
            .write(self.leased(requests, lease))
            .await
            .map_err(Error::rpc("writing a blob to the content store"))?
            .into_inner();
        let taken = |slot: &std::sync::Mutex<Option<Error>>| slot.lock().ok().and_then(|mut e| e.take());
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(status) if status.code() == Code::AlreadyExists => break,
                Err(status) => {
                    return Err(
                        taken(&read_error).unwrap_or_else(|| Error::rpc("writing a blob to the content store")(status))
                    );
                }
            }
        }
        match taken(&read_error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Unpacks layers into the snapshotter: for each layer whose chain ID has no committed
    /// snapshot yet, prepare one on its parent, apply the layer through the diff service and
    /// commit it under the chain ID.
    async fn unpack(&self, lease: Option<&str>, layers: &[Desc], diff_ids: &[String]) -> Result<(), Error> {
        // Without a lease, garbage collection (which runs after every deletion) may remove
        // the half-made snapshot between prepare and commit; take one when needed.
        let mut own_lease = None;
        let result = self.unpack_leased(lease, &mut own_lease, layers, diff_ids).await;
        if let Some(own) = own_lease {
            self.delete_lease(&own).await;
        }
        result
    }

    async fn unpack_leased(
        &self,
        lease: Option<&str>,
        own_lease: &mut Option<String>,
        layers: &[Desc],
        diff_ids: &[String],
    ) -> Result<(), Error> {
        let chains = chain_ids(diff_ids);
        let mut snapshots = SnapshotsClient::new(self.channel());
        let mut diff = DiffClient::new(self.channel());
        for (i, layer) in layers.iter().enumerate() {
            let chain = &chains[i];
            let stat = snapshots
                .stat(self.request(StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: chain.clone(),
                }))
                .await;
            match stat {
                Ok(_) => continue,
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(Error::rpc("looking up a layer snapshot")(status)),
            }
            let parent = if i == 0 { String::new() } else { chains[i - 1].clone() };
            let key = format!("weir-extract-{}-{chain}", unique_suffix());
            let lease = match (lease, own_lease.as_deref()) {
                (Some(lease), _) => lease.to_string(),
                (None, Some(own)) => own.to_string(),
                (None, None) => own_lease.insert(self.create_lease().await?).clone(),
            };
            let mounts = snapshots
                .prepare(self.leased(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                        parent,
                        labels: HashMap::new(),
                    },
                    &lease,
                ))
                .await
                .map_err(Error::rpc("preparing a snapshot to unpack a layer into"))?
                .into_inner()
                .mounts;
            let applied = diff
                .apply(self.request(ApplyRequest {
                    diff: Some(to_descriptor(layer)),
                    mounts,
                    ..Default::default()
                }))
                .await;
            let applied = match applied {
                Ok(response) => response.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
                Err(status) => {
                    self.remove_snapshot(&key).await;
                    return Err(Error::rpc("unpacking a layer (diff service apply)")(status));
                }
            };
            if applied != diff_ids[i] {
                self.remove_snapshot(&key).await;
                return Err(Error::Archive(format!(
                    "layer {} unpacks to {applied} but the image config says {}; the image is damaged",
                    layer.digest, diff_ids[i]
                )));
            }
            let committed = snapshots
                .commit(self.leased(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain.clone(),
                        key: key.clone(),
                        ..Default::default()
                    },
                    &lease,
                ))
                .await;
            match committed {
                Ok(_) => {}
                Err(status) if status.code() == Code::AlreadyExists => self.remove_snapshot(&key).await,
                Err(status) => {
                    self.remove_snapshot(&key).await;
                    return Err(Error::rpc("committing an unpacked layer")(status));
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn remove_snapshot(&self, key: &str) {
        let _ = SnapshotsClient::new(self.channel())
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await;
    }

    /// A lease keeps blobs and snapshots of an import from garbage collection until the
    /// image record refers to them; it expires by itself if the agent dies mid-import.
    pub(super) async fn create_lease(&self) -> Result<String, Error> {
        let id = format!("weir-unpack-{}", unique_suffix());
        let expire = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_hours(1))
            .map_err(|e| Error::Containerd(format!("computing the import lease's expiry: {e}")))?
            .to_string();
        LeasesClient::new(self.channel())
            .create(self.request(CreateLeaseRequest {
                id: id.clone(),
                labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
            }))
            .await
            .map_err(Error::rpc("creating a lease for the import"))?;
        Ok(id)
    }

    pub(super) async fn delete_lease(&self, id: &str) {
        let _ = LeasesClient::new(self.channel())
            .delete(self.request(DeleteLeaseRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await;
    }

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, Error> {
        let mut stream = ContentClient::new(self.channel())
            .read(self.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(Error::rpc("reading a blob from the content store"))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(Error::rpc("reading a blob from the content store"))?
        {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// The images on this node, by name.
    pub async fn list_images(&self) -> Result<Vec<String>, Error> {
        let images = ImagesClient::new(self.channel())
            .list(self.request(ListImagesRequest::default()))
            .await
            .map_err(Error::rpc("listing images"))?
            .into_inner()
            .images;
        let mut names: Vec<String> = images.into_iter().map(|i| i.name).collect();
        names.sort();
        Ok(names)
    }

    /// The image `reference` if it is on this node, unpacked (layers unpacked again when
    /// their snapshots are missing), with its run defaults; a missing image is
    /// [`Error::ImageNotPresent`]. [`Runtime::ensure_image_with`] pulls as a policy says.
    pub async fn ensure_image(&self, reference: &str) -> Result<Image, Error> {
        let name = normalize_reference(reference)?;
        let record = ImagesClient::new(self.channel())
            .get(self.request(GetImageRequest { name: name.clone() }))
            .await;
        let record = match record {
            Ok(r) => r.into_inner().image,
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(Error::rpc("looking up an image")(status)),
        };
        let target = record.and_then(|r| r.target).ok_or_else(|| Error::ImageNotPresent {
            reference: name.clone(),
        })?;
        let mut manifest_desc = Desc {
            media_type: target.media_type.clone(),
            digest: target.digest.clone(),
            size: target.size,
            ..Default::default()
        };
        if manifest_desc.media_type == OCI_INDEX || manifest_desc.media_type == DOCKER_MANIFEST_LIST {
            let index: Index = parse_json(&target.digest, &self.read_blob(&target.digest).await?)?;
            manifest_desc = pick_platform(&index, &format!("the index of {name}"))?;
        }
        let manifest: Manifest = parse_json(&manifest_desc.digest, &self.read_blob(&manifest_desc.digest).await?)?;
        let config: ImageConfigFile = parse_json("the image config", &self.read_blob(&manifest.config.digest).await?)?;
        let diff_ids = config.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
        self.unpack(None, &manifest.layers, &diff_ids).await?;
        let chain_id = chain_ids(&diff_ids).pop().ok_or_else(|| {
            Error::Archive(format!(
                "image {name} has no layers: a container needs a root file system"
            ))
        })?;
        Ok(Image {
            name,
            digest: target.digest,
            chain_id,
            defaults: defaults_of(&config),
        })
    }
}

/// Plans for an OCI image archive: one per index entry that names an image.
fn oci_plans(archive: &Archive) -> Result<Vec<Plan<Region>>, Error> {
    let index: Index = parse_json("index.json", &archive.read("index.json")?)?;
    let mut plans = Vec::new();
    for entry in &index.manifests {
        let name = entry
            .annotations
            .get(CONTAINERD_NAME_ANNOTATION)
            .or_else(|| entry.annotations.get(OCI_REF_ANNOTATION).filter(|r| r.contains('/')));
        let Some(name) = name else { continue };
        let mut desc = entry.clone();
        desc.annotations.clear();
        if desc.media_type == OCI_INDEX || desc.media_type == DOCKER_MANIFEST_LIST {
            let nested: Index = parse_json(&desc.digest, &archive.read_blob(&desc.digest)?)?;
            desc = pick_platform(&nested, &format!("the index of {name}"))?;
        }
        let manifest: Manifest = parse_json(&desc.digest, &archive.read_blob(&desc.digest)?)?;
        let config = archive.read_blob(&manifest.config.digest)?;
        let manifest_source = Source::At(archive.blob(&desc.digest)?);
        let layers = manifest
            .layers
            .iter()
            .map(|l| Ok((l.clone(), Source::At(archive.blob(&l.digest)?))))
            .collect::<Result<Vec<_>, Error>>()?;
        plans.push(Plan {
            names: vec![normalize_reference(name)?],
            manifest: (desc, manifest_source),
            config: (manifest.config, config),
            layers,
        });
    }
    if plans.is_empty() {
        return Err(Error::Archive(format!(
            "{}: index.json names no image (no {CONTAINERD_NAME_ANNOTATION} or full {OCI_REF_ANNOTATION} \
             annotation); export it with `ctr images export` or `docker save NAME:TAG`",
            archive.path.display()
        )));
    }
    Ok(plans)
}

/// Plans for a `docker save` tarball: manifest.json gives config and layer paths; the
/// Docker schema-2 manifest containerd stores is made here, as `ctr import` does.
fn docker_plans(archive: &Archive) -> Result<Vec<Plan<Region>>, Error> {
    let entries: Vec<DockerSaveEntry> = parse_json("manifest.json", &archive.read("manifest.json")?)?;
    let mut plans = Vec::new();
    for entry in entries {
        let names = entry.repo_tags.clone().unwrap_or_default();
        if names.is_empty() {
            return Err(Error::Archive(format!(
                "{}: an image in manifest.json has no RepoTags; save it by name (`docker save NAME:TAG`)",
                archive.path.display()
            )));
        }
        let names = names
            .iter()
            .map(|n| normalize_reference(n))
            .collect::<Result<Vec<_>, _>>()?;
        let config = archive.read(&entry.config)?;
        let config_desc = Desc {
            media_type: DOCKER_CONFIG.into(),
            digest: format!("sha256:{:x}", Sha256::digest(&config)),
            size: config.len() as i64,
            ..Default::default()
        };
        let mut layers = Vec::new();
        for path in &entry.layers {
            let region = archive.region(path)?;
            let head = archive.read_at(region.offset, region.size.min(2) as usize)?;
            let media_type = if head == [0x1f, 0x8b] {
                DOCKER_LAYER_GZIP
            } else {
                DOCKER_LAYER
            };
            let digest = archive.digest_of(region)?;
            layers.push((
                Desc {
                    media_type: media_type.into(),
                    digest,
                    size: region.size as i64,
                    ..Default::default()
                },
                Source::At(region),
            ));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": config_desc,
            "layers": layers.iter().map(|(d, _)| d).collect::<Vec<_>>(),
        });
        let manifest =
            serde_json::to_vec(&manifest).map_err(|e| Error::Archive(format!("serialising a Docker manifest: {e}")))?;
        let manifest_desc = Desc {
            media_type: DOCKER_MANIFEST.into(),
            digest: format!("sha256:{:x}", Sha256::digest(&manifest)),
            size: manifest.len() as i64,
            ..Default::default()
        };
        plans.push(Plan {
            names,
            manifest: (manifest_desc, Source::Memory(manifest)),
            config: (config_desc, config),
            layers,
        });
    }
    Ok(plans)
}

/// A suffix that keeps temporary keys (snapshots, leases) of concurrent imports apart.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised_like_docker_does() {
        let n = |r: &str| normalize_reference(r).unwrap();
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(n("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(n("user/app"), "docker.io/user/app:latest");
        assert_eq!(n("weir.local/echo:latest"), "weir.local/echo:latest");
        assert_eq!(n("localhost:5000/a/b"), "localhost:5000/a/b:latest");
        assert_eq!(n("localhost/x@sha256:abc"), "localhost/x@sha256:abc");
        assert!(normalize_reference("Busybox").is_err());
        assert!(normalize_reference("").is_err());
    }

    #[test]
    fn chain_ids_follow_the_oci_spec() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(
            chains[1],
            format!("sha256:{:x}", Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
    }

    #[test]
    fn indexes_give_the_manifest_for_this_platform() {
        let index: Index = serde_json::from_value(serde_json::json!({"manifests": [
            {"mediaType": OCI_MANIFEST, "digest": "sha256:arm", "size": 1,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:att", "size": 1,
             "platform": {"os": "unknown", "architecture": "unknown"}},
            {"mediaType": DOCKER_MANIFEST, "digest": "sha256:amd", "size": 1,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_INDEX, "digest": "sha256:nested", "size": 1,
             "platform": {"os": "linux", "architecture": "riscv64"}},
        ]}))
        .unwrap();
        assert_eq!(pick_platform_for(&index, "i", "amd64").unwrap().digest, "sha256:amd");
        assert_eq!(pick_platform_for(&index, "i", "arm64").unwrap().digest, "sha256:arm");
        let err = pick_platform_for(&index, "the index of x", "riscv64")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no manifest for linux/riscv64 (it has: linux/arm64, unknown/unknown, linux/amd64)"),
            "{err}"
        );
        // One manifest without a platform (as `ctr images export` writes) is taken as is;
        // one for another platform is not.
        let single: Index = serde_json::from_value(serde_json::json!({"manifests": [
            {"mediaType": OCI_MANIFEST, "digest": "sha256:only", "size": 1}
        ]}))
        .unwrap();
        assert_eq!(pick_platform_for(&single, "i", "amd64").unwrap().digest, "sha256:only");
        let foreign: Index = serde_json::from_value(serde_json::json!({"manifests": [
            {"mediaType": OCI_MANIFEST, "digest": "sha256:s390", "size": 1,
             "platform": {"os": "linux", "architecture": "s390x"}}
        ]}))
        .unwrap();
        assert!(pick_platform_for(&foreign, "i", "amd64").is_err());
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host_architecture(), "amd64");
        }
    }

    fn tarball(dir: &Path, name: &str, members: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join(name);
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        for (member, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, member, *data).unwrap();
        }
        builder.finish().unwrap();
        path
    }

    #[test]
    fn docker_save_tarballs_become_schema2_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let config = br#"{"config":{"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#;
        let layer = b"plain tar bytes";
        let save = br#"[{"Config":"c.json","RepoTags":["busybox:1"],"Layers":["l/layer.tar"]}]"#;
        let path = tarball(
            dir.path(),
            "save.tar",
            &[("c.json", config), ("l/layer.tar", layer), ("manifest.json", save)],
        );
        let archive = Archive::open(&path).unwrap();
        let plans = docker_plans(&archive).unwrap();
        assert_eq!(plans.len(), 1);
        let plan = &plans[0];
        assert_eq!(plan.names, ["docker.io/library/busybox:1"]);
        assert_eq!(plan.config.0.digest, format!("sha256:{:x}", Sha256::digest(config)));
        assert_eq!(plan.layers[0].0.media_type, DOCKER_LAYER);
        assert_eq!(plan.layers[0].0.digest, format!("sha256:{:x}", Sha256::digest(layer)));
        let Source::Memory(manifest) = &plan.manifest.1 else {
            panic!("the manifest is made in memory")
        };
        assert_eq!(plan.manifest.0.digest, format!("sha256:{:x}", Sha256::digest(manifest)));
        let manifest: serde_json::Value = serde_json::from_slice(manifest).unwrap();
        assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        assert!(manifest["layers"][0].get("platform").is_none(), "{manifest}");

        let untagged = br#"[{"Config":"c.json","RepoTags":null,"Layers":["l/layer.tar"]}]"#;
        let path = tarball(
            dir.path(),
            "untagged.tar",
            &[("c.json", config), ("l/layer.tar", layer), ("manifest.json", untagged)],
        );
        let err = docker_plans(&Archive::open(&path).unwrap()).err().unwrap().to_string();
        assert!(err.contains("docker save NAME:TAG"), "{err}");
    }

    #[test]
    fn oci_archives_need_a_name_and_every_blob() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"c","digest":"sha256:cc","size":2},"layers":[]}"#;
        let digest = format!("sha256:{:x}", Sha256::digest(manifest));
        let blob = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let unnamed = format!(
            r#"{{"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{}}}]}}"#,
            manifest.len()
        );
        let path = tarball(
            dir.path(),
            "unnamed.tar",
            &[("index.json", unnamed.as_bytes()), (&blob, manifest)],
        );
        let err = oci_plans(&Archive::open(&path).unwrap()).err().unwrap().to_string();
        assert!(err.contains("names no image"), "{err}");

        let named = unnamed.replace(
            r#""size":"#,
            r#""annotations":{"io.containerd.image.name":"weir.local/x:1"},"size":"#,
        );
        let path = tarball(
            dir.path(),
            "named.tar",
            &[("index.json", named.as_bytes()), (&blob, manifest)],
        );
        let err = oci_plans(&Archive::open(&path).unwrap()).err().unwrap().to_string();
        assert!(
            err.contains("has no member blobs/sha256/cc"),
            "the config blob is missing: {err}"
        );
    }
}
