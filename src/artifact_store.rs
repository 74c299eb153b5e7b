//! Where artifacts are kept: a local folder (a folder per UTC day, one file per artifact,
//! `file://` URLs) or, with the `s3` feature and `artifacts.url = "s3://…"`, an
//! S3-compatible bucket (`s3://` URLs). The runner stores a run's artifacts here
//! ([`crate::runner::artifacts`]) and retention deletes old ones; neither knows which
//! backend it is.
//!
//! A file is streamed to the backend (a bounded copy into the folder, or a multipart upload
//! of [`UPLOAD_PART_BYTES`] parts into the bucket), never held whole in memory, and one that
//! turns out longer or shorter than announced is not stored.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// Size of the parts of a multipart upload to a bucket (S3's smallest), and of the buffer an
/// upload starts with: an object smaller than this is sent in one request.
pub const UPLOAD_PART_BYTES: usize = 5 * 1024 * 1024;

/// Parts of one upload sent at the same time; one more fills meanwhile, so an upload holds
/// at most this many parts plus one in memory.
pub const UPLOAD_PARTS_IN_FLIGHT: usize = 2;

/// Where a local artifact goes: `dir/<UTC day>/<run id>-<name>`. A folder per day, not per
/// run: creating a file and a folder for every run doubled the inodes a burst allocates,
/// which on some disks is most of a short run's cost (docs/benchmarks.md); a day's folder
/// is created once, and retention empties the old ones.
fn local_place(dir: &Path, run_id: Uuid, name: &str, at: DateTime<Utc>) -> (PathBuf, PathBuf) {
    let folder = dir.join(at.format("%Y-%m-%d").to_string());
    let path = folder.join(format!("{run_id}-{name}"));
    (folder, path)
}

/// Creates the day's `folder` inside the store's `dir`, both (when created here) such that
/// only agentd's user may list or enter them; the folders above `dir` get the usual modes
/// (an embedded database may live beside it).
fn private_folder(dir: &Path, folder: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    for path in [dir, folder] {
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}

/// Creates (or truncates) the artifact file at `path`, readable by agentd's user only (the
/// programs of other runs, other tenants', run on this host too), creating its folder first.
/// A folder retention removed between the two (its last old file deleted) is made again.
fn create_private_file(dir: &Path, folder: &Path, path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
    };
    private_folder(dir, folder)?;
    match open() {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            private_folder(dir, folder)?;
            open()
        }
        other => other,
    }
}

/// An artifact's content as a reader of at most one byte more than its announced `size`,
/// so that a file growing while it is copied is noticed without copying the growth.
fn bounded_reader(content: ArtifactContent) -> (Box<dyn AsyncRead + Send + Unpin>, u64) {
    match content {
        ArtifactContent::Bytes(data) => {
            let size = data.len() as u64;
            (Box::new(std::io::Cursor::new(data)), size)
        }
        ArtifactContent::File { file, size } => (Box::new(file.take(size.saturating_add(1))), size),
    }
}

/// Why a copy of `copied` bytes does not match the announced `size`; `None` when it does.
fn size_mismatch(size: u64, copied: u64) -> Option<String> {
    match copied.cmp(&size) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(format!(
            "the file grew past its {size} bytes while it was stored"
        )),
        std::cmp::Ordering::Less => Some(format!(
            "the file shrank from {size} to {copied} bytes while it was stored"
        )),
    }
}

/// A file a run produced, on its way to the runner's artifact store, which checks its size
/// against the limits before reading any of it.
#[derive(Debug)]
pub struct ArtifactFile {
    /// The name the run gave it (the store makes it safe for a path).
    pub name: String,
    /// MIME type; `None`: guessed from the name.
    pub content_type: Option<String>,
    /// Its bytes, or the file holding them.
    pub content: ArtifactContent,
}

/// What an artifact holds: bytes already in memory, or a file nobody has read yet, so that a
/// program's huge file costs no memory before the store refuses it.
#[derive(Debug)]
pub enum ArtifactContent {
    /// Bytes an executor made or received (builtin, webhook).
    Bytes(Vec<u8>),
    /// An open regular file (command) and its size when it was opened; the store reads at
    /// most one byte more than `size`, so a file that keeps growing is noticed, not copied.
    File { file: tokio::fs::File, size: u64 },
}

impl ArtifactFile {
    /// An artifact of bytes in memory.
    pub fn bytes(
        name: impl Into<String>,
        content_type: Option<String>,
        data: Vec<u8>,
    ) -> ArtifactFile {
        ArtifactFile {
            name: name.into(),
            content_type,
            content: ArtifactContent::Bytes(data),
        }
    }

    /// The regular file at `path` as an artifact named `name`, opened without reading it: a
    /// symbolic link is not followed (`O_NOFOLLOW`), a FIFO or device is refused without
    /// waiting on it (`O_NONBLOCK`, then fstat of what was opened). The error says why.
    pub fn open_regular(
        name: String,
        path: &std::path::Path,
        owner: Option<u32>,
    ) -> Result<ArtifactFile, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|error| match error.raw_os_error() {
                Some(nix::libc::ELOOP) => "a symbolic link, which is not followed".to_string(),
                _ => format!("cannot open it: {error}"),
            })?;
        let metadata = file
            .metadata()
            .map_err(|error| format!("cannot inspect it: {error}"))?;
        if !metadata.is_file() {
            return Err("not a regular file".into());
        }
        if let Some(owner) = owner {
            use std::os::unix::fs::MetadataExt;
            if metadata.uid() != owner {
                return Err(format!(
                    "owned by uid {}, not by the run's user (a link to someone else's file)",
                    metadata.uid()
                ));
            }
        }
        Ok(ArtifactFile {
            name,
            content_type: None,
            content: ArtifactContent::File {
                file: tokio::fs::File::from_std(file),
                size: metadata.len(),
            },
        })
    }

    /// The artifact's size in bytes (a file's when it was opened).
    pub fn size(&self) -> u64 {
        match &self.content {
            ArtifactContent::Bytes(data) => data.len() as u64,
            ArtifactContent::File { size, .. } => *size,
        }
    }
}

/// The artifact store: where files go, and the limits a run's artifacts are held to.
#[derive(Clone)]
pub struct ArtifactStore {
    pub backend: ArtifactBackend,
    pub max_bytes: u64,
    pub max_bytes_per_run: u64,
    /// Longest wait between retries of a row while the database is unreachable.
    pub max_backoff: std::time::Duration,
}

/// Where artifact files go.
#[derive(Clone)]
pub enum ArtifactBackend {
    /// A local folder; a sub-folder per UTC day, a file per artifact.
    Local(PathBuf),
    /// An S3-compatible bucket: objects under `prefix/<run id>/`.
    #[cfg(feature = "s3")]
    Bucket {
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        bucket: String,
        prefix: String,
    },
    /// A bucket whose client could not be built; every artifact is refused with the reason.
    Unavailable(String),
}

impl ArtifactStore {
    /// The store the settings describe.
    pub fn from_settings(
        settings: &crate::config::ArtifactSettings,
        max_backoff: std::time::Duration,
    ) -> ArtifactStore {
        let backend = match &settings.url {
            None => ArtifactBackend::Local(settings.dir.clone()),
            Some(url) => bucket_backend(url, &settings.s3_options),
        };
        if let ArtifactBackend::Unavailable(reason) = &backend {
            tracing::error!(reason = %reason, "artifact bucket unavailable; artifacts will not be stored");
        }
        ArtifactStore {
            backend,
            max_bytes: settings.max_bytes,
            max_bytes_per_run: settings.max_bytes_per_run,
            max_backoff,
        }
    }
}

#[cfg(feature = "s3")]
fn bucket_backend(url: &str, options: &[(String, String)]) -> ArtifactBackend {
    let parsed = url::Url::parse(url).ok();
    let bucket = parsed
        .as_ref()
        .and_then(url::Url::host_str)
        .unwrap_or_default();
    let prefix = parsed.as_ref().map_or("", |parsed| parsed.path());
    let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name(bucket);
    for (name, value) in options {
        if let Ok(key) = name.parse::<object_store::aws::AmazonS3ConfigKey>() {
            builder = builder.with_config(key, value.clone());
        }
    }
    match builder.build() {
        Ok(store) => ArtifactBackend::Bucket {
            store: std::sync::Arc::new(store),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        },
        Err(error) => ArtifactBackend::Unavailable(format!("artifact bucket {url}: {error}")),
    }
}

#[cfg(not(feature = "s3"))]
fn bucket_backend(url: &str, _options: &[(String, String)]) -> ArtifactBackend {
    ArtifactBackend::Unavailable(format!(
        "{url}: this agentd was built without the s3 feature"
    ))
}

impl ArtifactBackend {
    /// Stores one artifact, streaming it; returns its URL.
    pub async fn write(
        &self,
        run_id: Uuid,
        name: &str,
        content: ArtifactContent,
    ) -> Result<String, String> {
        let content = match (self, content) {
            (ArtifactBackend::Local(dir), ArtifactContent::Bytes(data)) => {
                // Bytes in memory (builtin, webhook): the folders and the file in one trip to
                // a blocking thread, not one per call.
                let (folder, path) = local_place(dir, run_id, name, Utc::now());
                let dir = dir.clone();
                return tokio::task::spawn_blocking(move || {
                    write_bytes(&dir, &folder, &path, &data)
                })
                .await
                .map_err(|error| error.to_string())?;
            }
            (_, content) => content,
        };
        let (mut reader, size) = bounded_reader(content);
        match self {
            ArtifactBackend::Local(dir) => {
                let (folder, path) = local_place(dir, run_id, name, Utc::now());
                let copied = async {
                    let (dir, folder, target) = (dir.clone(), folder, path.clone());
                    let file = tokio::task::spawn_blocking(move || {
                        create_private_file(&dir, &folder, &target)
                    })
                    .await
                    .map_err(std::io::Error::other)??;
                    let mut file = tokio::fs::File::from_std(file);
                    let copied = tokio::io::copy(&mut reader, &mut file).await?;
                    file.flush().await?;
                    Ok::<u64, std::io::Error>(copied)
                }
                .await;
                let failure = match copied {
                    Ok(copied) => size_mismatch(size, copied),
                    Err(error) => Some(error.to_string()),
                };
                if let Some(failure) = failure {
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(failure);
                }
                Ok(file_url(&path))
            }
            #[cfg(feature = "s3")]
            ArtifactBackend::Bucket {
                store,
                bucket,
                prefix,
            } => {
                let key = if prefix.is_empty() {
                    format!("{run_id}/{name}")
                } else {
                    format!("{prefix}/{run_id}/{name}")
                };
                let location =
                    object_store::path::Path::parse(&key).map_err(|error| error.to_string())?;
                let mut upload = object_store::buffered::BufWriter::with_capacity(
                    store.clone(),
                    location.clone(),
                    UPLOAD_PART_BYTES,
                )
                .with_max_concurrency(UPLOAD_PARTS_IN_FLIGHT);
                let failure = match tokio::io::copy(&mut reader, &mut upload).await {
                    Ok(copied) => size_mismatch(size, copied),
                    Err(error) => Some(error.to_string()),
                };
                if let Some(failure) = failure {
                    // Nothing is stored until the upload completes; abort drops its parts.
                    let _ = upload.abort().await;
                    return Err(failure);
                }
                upload.shutdown().await.map_err(|error| error.to_string())?;
                Ok(format!("s3://{bucket}/{location}"))
            }
            ArtifactBackend::Unavailable(reason) => Err(reason.clone()),
        }
    }

    /// Deletes the stored file or object behind `url` (retention). One already gone counts
    /// as deleted. Refuses URLs outside this store (another folder, another bucket): those
    /// are not agentd's to delete.
    pub async fn delete(&self, url: &str) -> Result<(), String> {
        match self {
            ArtifactBackend::Local(dir) => {
                let path = path_of_file_url(url)
                    .ok_or_else(|| format!("{url}: not a file:// URL of this artifact store"))?;
                let root = std::path::absolute(dir).map_err(|error| error.to_string())?;
                let inside = path.starts_with(&root)
                    && path
                        .components()
                        .all(|part| !matches!(part, std::path::Component::ParentDir));
                if !inside {
                    return Err(format!("{url}: outside artifacts.dir ({})", root.display()));
                }
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(format!("{}: {error}", path.display())),
                }
                // The day's folder (or, for files stored before folders were per day, the
                // run's) goes with its last file.
                if let Some(folder) = path.parent().filter(|folder| *folder != root) {
                    let _ = tokio::fs::remove_dir(folder).await;
                }
                Ok(())
            }
            #[cfg(feature = "s3")]
            ArtifactBackend::Bucket { store, bucket, .. } => {
                use object_store::ObjectStoreExt;
                let key = url
                    .strip_prefix("s3://")
                    .and_then(|rest| rest.strip_prefix(bucket.as_str()))
                    .and_then(|rest| rest.strip_prefix('/'))
                    .ok_or_else(|| format!("{url}: not an object of bucket {bucket}"))?;
                let location =
                    object_store::path::Path::parse(key).map_err(|error| error.to_string())?;
                match store.delete(&location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(error) => Err(error.to_string()),
                }
            }
            ArtifactBackend::Unavailable(reason) => Err(reason.clone()),
        }
    }
}

/// The path a `file://` URL made by [`file_url`] names.
fn path_of_file_url(url: &str) -> Option<PathBuf> {
    let url = url::Url::parse(url).ok()?;
    if url.scheme() != "file" {
        return None;
    }
    url.to_file_path().ok()
}

/// A file name that stays inside its folder: path separators and control
/// characters become `_`, `.`/`..`/empty names get a neutral one, and long ones are cut.
pub fn safe_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let cleaned = cleaned.trim().to_string();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        "artifact".into()
    } else {
        // Bytes, not characters: the file is `<run id>-<name>` (37 bytes more, and `N-` for a
        // repeated name), and file systems limit a name to 255 bytes.
        let mut end = cleaned.len().min(NAME_BYTES);
        while !cleaned.is_char_boundary(end) {
            end -= 1;
        }
        cleaned[..end].to_string()
    }
}

/// The most bytes of an artifact's name kept ([`safe_name`]).
const NAME_BYTES: usize = 200;

/// `name`, or `N-name` when a run already stored one of that name.
pub fn unique_name(name: &str, used: &mut Vec<String>) -> String {
    let mut candidate = name.to_string();
    let mut counter = 2;
    while used.contains(&candidate) {
        candidate = format!("{counter}-{name}");
        counter += 1;
    }
    used.push(candidate.clone());
    candidate
}

/// Writes `data` as `path` in the day's `folder` of `dir` ([`create_private_file`]);
/// returns its URL. A partial file is removed.
fn write_bytes(dir: &Path, folder: &Path, path: &Path, data: &[u8]) -> Result<String, String> {
    use std::io::Write;
    let written = create_private_file(dir, folder, path).and_then(|mut file| file.write_all(data));
    match written {
        Ok(()) => Ok(file_url(path)),
        Err(error) => {
            let _ = std::fs::remove_file(path);
            Err(error.to_string())
        }
    }
}

/// `file://` URL of an absolute path, with the characters URLs cannot hold escaped.
fn file_url(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    url::Url::from_file_path(&absolute)
        .map(String::from)
        // Only a relative path has no file URL, and the path was made absolute.
        .unwrap_or_else(|()| format!("file://{}", absolute.display()))
}

/// The MIME type for a file name's extension (application/octet-stream when unknown).
pub fn guess_type(name: &str) -> String {
    mime_guess::from_path(name)
        .first_or_octet_stream()
        .essence_str()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_in_the_folder_and_types_are_guessed() {
        assert_eq!(safe_name("../../etc/passwd"), ".._.._etc_passwd");
        assert_eq!(safe_name(".."), "artifact");
        // 200 bytes at most, cut at a character's boundary: 150 two-byte characters become
        // 100, and one more byte before them moves the cut back a character.
        assert_eq!(safe_name(&"é".repeat(150)), "é".repeat(100));
        assert_eq!(
            safe_name(&format!("a{}", "é".repeat(150))),
            format!("a{}", "é".repeat(99))
        );
        assert_eq!(safe_name(&"x".repeat(300)).len(), 200);
        let mut used = Vec::new();
        assert_eq!(unique_name("a.md", &mut used), "a.md");
        assert_eq!(unique_name("a.md", &mut used), "2-a.md");
        assert_eq!(guess_type("Report.MD"), "text/markdown");
        assert_eq!(guess_type("data"), "application/octet-stream");
        let path = Path::new("/var/lib/agentd/a b/résumé%.md");
        assert_eq!(path_of_file_url(&file_url(path)).as_deref(), Some(path));
        // A stray `%` is read as itself, as URL parsers do.
        assert_eq!(
            path_of_file_url("file:///x/%zz").as_deref(),
            Some(Path::new("/x/%zz"))
        );
        assert_eq!(path_of_file_url("s3://b/k"), None);
        assert_eq!(file_url(Path::new("/tmp/a b.md")), "file:///tmp/a%20b.md");
    }

    fn file_of(path: &Path, data: &[u8], announced: u64) -> ArtifactContent {
        std::fs::write(path, data).unwrap();
        ArtifactContent::File {
            file: tokio::fs::File::from_std(std::fs::File::open(path).unwrap()),
            size: announced,
        }
    }

    #[tokio::test]
    async fn a_file_is_copied_only_when_it_has_the_size_it_announced() {
        let source = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let backend = ArtifactBackend::Local(store.path().to_path_buf());
        let run_id = Uuid::new_v4();

        let content = file_of(&source.path().join("a"), b"hello", 5);
        let url = backend.write(run_id, "a.txt", content).await.unwrap();
        let stored = path_of_file_url(&url).unwrap();
        // A folder per UTC day (the one the file was written on), the run id in the name.
        let day = stored.parent().unwrap();
        assert_eq!(
            day.parent(),
            Some(std::path::absolute(store.path()).unwrap().as_path())
        );
        assert!(
            chrono::NaiveDate::parse_from_str(
                &day.file_name().unwrap().to_string_lossy(),
                "%Y-%m-%d"
            )
            .is_ok(),
            "{url}"
        );
        assert_eq!(
            stored.file_name().unwrap().to_string_lossy(),
            format!("{run_id}-a.txt")
        );
        assert_eq!(std::fs::read(&stored).unwrap(), b"hello");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!((mode(day), mode(&stored)), (0o700, 0o600));
        }

        // It grew after it was checked: refused after one byte more, nothing left behind.
        let content = file_of(&source.path().join("b"), &[7; 100_000], 10);
        assert_eq!(
            backend.write(run_id, "b.bin", content).await.unwrap_err(),
            "the file grew past its 10 bytes while it was stored"
        );
        assert!(!day.join(format!("{run_id}-b.bin")).exists());

        let content = file_of(&source.path().join("c"), b"abc", 5);
        assert_eq!(
            backend.write(run_id, "c.bin", content).await.unwrap_err(),
            "the file shrank from 5 to 3 bytes while it was stored"
        );
        assert!(!day.join(format!("{run_id}-c.bin")).exists());

        let url = backend
            .write(run_id, "d.md", ArtifactContent::Bytes(b"# d".to_vec()))
            .await
            .unwrap();
        assert!(url.ends_with(&format!("/{run_id}-d.md")));
        assert_eq!(
            std::fs::read(path_of_file_url(&url).unwrap()).unwrap(),
            b"# d"
        );

        // Retention deletes both; the day's folder goes with its last file.
        backend.delete(&url).await.unwrap();
        assert!(day.exists());
        backend
            .delete(&format!("file://{}", stored.display()))
            .await
            .unwrap();
        assert!(!day.exists());

        // The next file makes the day's folder again.
        let url = backend
            .write(run_id, "e.md", ArtifactContent::Bytes(b"e".to_vec()))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(path_of_file_url(&url).unwrap()).unwrap(),
            b"e"
        );
    }
}
