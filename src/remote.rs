//! Objects in object storage (S3 and what speaks its API, Google Cloud Storage, Azure Blob
//! Storage) and on HTTP servers that serve ranges, as sources, through the `object_store`
//! crate: `s3://bucket/key`, `gs://bucket/key`, `az://container/key`, `https://host/path`.
//!
//! Opening reads the header: one ranged read of the first [`GUESS`] bytes (which also gives
//! the object's size and version), a second where the header is longer. The data is then read
//! by the host I/O engine like a local file's with positioned reads: each piece it asks for
//! (up to 4 MiB, neighbouring small tensors in one) is fetched as ranged reads of at most the
//! part size, at most `concurrency` of them in flight (in all the objects opened with that
//! limit), straight into the piece's destination (the CPU arena, a GPU's staging ring):
//! memory is bounded as for a local file. Every read after the first asks for the version the first saw (`If-Match` on
//! its ETag), so that an object replaced during a load is an error, not a mix of two files.
//!
//! Transient failures (connection resets, 5xx, throttling) are retried by `object_store`'s
//! policy ([`RemoteOptions::retries`], backing off); each request has a timeout, and a
//! deadline over its retries bounds every read: a server that stops answering is an error
//! naming the URL and the bytes, never a hang. A range answered short (a truncated object) is
//! an error too. Credentials and endpoints come from the environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`, as each store's `from_env` reads them) and from explicit options
//! (the stores' configuration keys, such as `aws_endpoint` or `aws_access_key_id`).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::path::Path as Location;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreScheme, RetryConfig};

use crate::error::{Error, ErrorKind, Result};
use crate::header::{Header, N_LEN};
use crate::read::file::{HostFile, RangeSource};

/// The bytes the first read of an object asks for: the header of nearly every checkpoint.
pub const GUESS: u64 = 1 << 20;

/// How objects are read (see the module); [`Loader`](crate::Loader)'s `remote_*` options
/// set them.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The stores' configuration keys and values, over those of the environment.
    pub options: Vec<(String, String)>,
    /// The largest ranged read, in bytes.
    pub part_size: usize,
    /// Ranged reads in flight at once, at most, in all the objects opened with this limit
    /// (a checkpoint's shards, loads on other threads asking the same).
    pub concurrency: usize,
    /// Retries of a read that failed transiently.
    pub retries: usize,
    /// The time one request may take, retries not counted.
    pub timeout: Duration,
}

impl Default for RemoteOptions {
    /// 8 MiB parts, 32 reads in flight, 3 retries, 30 s a request; the environment's
    /// `TENSORPLACE_REMOTE_PART_SIZE` (bytes) and `TENSORPLACE_REMOTE_CONCURRENCY` where set
    /// (for the command line and Python, which take no options).
    fn default() -> Self {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        RemoteOptions {
            options: Vec::new(),
            part_size: var("TENSORPLACE_REMOTE_PART_SIZE")
                .unwrap_or(8 << 20)
                .max(1),
            concurrency: var("TENSORPLACE_REMOTE_CONCURRENCY").unwrap_or(32).max(1),
            retries: 3,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The schemes this module reads.
const SCHEMES: [&str; 9] = [
    "s3://", "s3a://", "gs://", "az://", "azure://", "abfs://", "abfss://", "http://", "https://",
];

/// Whether `path` is the URL of an object (see [`SCHEMES`]) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(|p| {
        SCHEMES
            .iter()
            .any(|s| p.len() > s.len() && p[..s.len()].eq_ignore_ascii_case(s))
    })
}

/// The runtime the stores' requests run on: two threads drive every request of the
/// process; the engine's reader threads wait on them.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("tensorplace-remote")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::new(ErrorKind::Io, format!("starting the I/O runtime: {e}")))
}

/// The limit of `concurrency` ranged reads in flight: one per value, shared by every object
/// opened with it (a checkpoint's shards, the loads of a process that all ask the default),
/// so that a load asking another limit gets its own.
fn in_flight(concurrency: usize) -> Arc<tokio::sync::Semaphore> {
    static LIMITS: OnceLock<Mutex<HashMap<usize, Arc<tokio::sync::Semaphore>>>> = OnceLock::new();
    let concurrency = concurrency.max(1);
    let mut limits = LIMITS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let limit = limits.entry(concurrency);
    Arc::clone(limit.or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(concurrency))))
}

/// One object, read by ranges.
struct RemoteObject {
    url: String,
    store: Arc<dyn ObjectStore>,
    location: Location,
    /// The version the first read saw, which every later read asks for.
    e_tag: Option<String>,
    part_size: usize,
    /// The longest a read may take, its retries included.
    deadline: Duration,
    limit: Arc<tokio::sync::Semaphore>,
}

/// Opens the object at `url` and reads its header. Every error names the URL.
pub(crate) fn open(url: &str, options: &RemoteOptions) -> Result<HostFile<'static>> {
    open_inner(url, options).map_err(|e| e.with_file(url))
}

fn open_inner(url: &str, options: &RemoteOptions) -> Result<HostFile<'static>> {
    let (object, first, size) = RemoteObject::open(url, options)?;
    let n = Header::read_len(first.get(..N_LEN).unwrap_or(&[]), size)?;
    let json = match first.get(N_LEN..N_LEN + n) {
        Some(json) => json.to_vec(),
        None => {
            let mut json = vec![0u8; n];
            object.read_exact_at(&mut json, N_LEN as u64)?;
            json
        }
    };
    let header = Header::parse_json(&json, size)?;
    Ok(HostFile::from_source(
        url.to_owned(),
        size,
        header,
        Box::new(object),
    ))
}

/// The store and the object's location in it for `url`: the store's own settings from the
/// environment, then `options`, with our retry policy and timeouts.
/// Makes rustls on ring the process's TLS provider, unless the application installed one
/// first: the stores' HTTPS clients need one (reqwest is built without a bundled provider).
fn install_tls_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    // Deprecated for its lack of post-quantum key exchange, which no store requires.
    #[allow(deprecated)]
    INSTALLED.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn store_for(url: &str, options: &RemoteOptions) -> Result<(Arc<dyn ObjectStore>, Location)> {
    install_tls_provider();
    let parsed = url::Url::parse(url)
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("not a URL: {e}")))?;
    let (scheme, location) = ObjectStoreScheme::parse(&parsed).map_err(|e| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("not an object's URL: {e}"),
        )
    })?;
    let retry = RetryConfig {
        max_retries: options.retries,
        retry_timeout: options.timeout * (options.retries as u32 + 1),
        ..RetryConfig::default()
    };
    // As configuration keys, after the environment's (a client-options value would replace
    // the environment's client settings, `AWS_ALLOW_HTTP` among them) and before the caller's.
    let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
    let timeouts = [
        ("timeout".to_owned(), ms(options.timeout)),
        (
            "connect_timeout".to_owned(),
            ms(options.timeout.min(Duration::from_secs(10))),
        ),
    ];
    let bad_key = |key: &str| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{key:?} is not an option of this store"),
        )
    };
    macro_rules! build {
        ($builder:expr) => {{
            let mut b = $builder.with_retry(retry);
            for (key, value) in timeouts.iter().chain(&options.options) {
                let key = key.to_ascii_lowercase();
                b = b.with_config(key.parse().map_err(|_| bad_key(&key))?, value.clone());
            }
            Arc::new(b.build().map_err(store_err)?) as Arc<dyn ObjectStore>
        }};
    }
    let store = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            build!(object_store::aws::AmazonS3Builder::from_env().with_url(url))
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            build!(object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url))
        }
        ObjectStoreScheme::MicrosoftAzure => {
            build!(object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url))
        }
        ObjectStoreScheme::Http => {
            let base = &parsed[..url::Position::BeforePath];
            // An `http://` URL asks for plain HTTP itself.
            let plain = parsed.scheme() == "http";
            build!(
                object_store::http::HttpBuilder::new()
                    .with_url(base)
                    .with_config(object_store::ClientConfigKey::AllowHttp, plain.to_string())
            )
        }
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{other:?} URLs are not read here"),
            ));
        }
    };
    Ok((store, location))
}

fn store_err(e: object_store::Error) -> Error {
    let kind = io_kind(&e);
    Error::io(
        "reading the object",
        None,
        std::io::Error::new(kind, e.to_string()),
    )
}

/// The I/O error kind of a store's error (`NotFound` for a missing object, say).
fn io_kind(e: &object_store::Error) -> std::io::ErrorKind {
    match e {
        object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => std::io::ErrorKind::PermissionDenied,
        _ => std::io::ErrorKind::Other,
    }
}

/// The whole object at `url`, of at most `max_len` bytes (an index). Errors name the URL.
pub(crate) fn fetch(url: &str, options: &RemoteOptions, max_len: u64) -> Result<Vec<u8>> {
    let fetch = || {
        let (object, mut bytes, size) = RemoteObject::open(url, options)?;
        if size > max_len {
            return Err(Error::new(
                ErrorKind::InvalidIndex,
                format!("{size} bytes: over the {max_len}-byte limit for an index"),
            ));
        }
        let have = bytes.len();
        bytes.resize(usize::try_from(size).unwrap_or(usize::MAX), 0);
        object.read_exact_at(&mut bytes[have..], have as u64)?;
        Ok(bytes)
    };
    fetch().map_err(|e| e.with_file(url))
}

impl RemoteObject {
    /// The object at `url`, with its first [`GUESS`] bytes (all of a smaller one) and size;
    /// later reads ask for the version this read saw.
    fn open(url: &str, options: &RemoteOptions) -> Result<(RemoteObject, Vec<u8>, u64)> {
        let (store, location) = store_for(url, options)?;
        let mut object = RemoteObject {
            url: url.to_owned(),
            store,
            location,
            e_tag: None,
            part_size: options.part_size.max(1),
            deadline: options.timeout * (options.retries as u32 + 1) + Duration::from_secs(10),
            limit: in_flight(options.concurrency),
        };
        let (first, size, e_tag) = object.first_read()?;
        object.e_tag = e_tag;
        Ok((object, first, size))
    }

    /// The first [`GUESS`] bytes (all of a smaller object), the object's size and version.
    fn first_read(&self) -> Result<(Vec<u8>, u64, Option<String>)> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(0..GUESS)),
            ..GetOptions::default()
        };
        self.run(0..GUESS, async {
            let _permit = self.limit.acquire().await;
            let got = self.store.get_opts(&self.location, options).await?;
            let (size, e_tag) = (got.meta.size, got.meta.e_tag.clone());
            let bytes = got.bytes().await?;
            Ok((bytes.to_vec(), size, e_tag))
        })
    }

    /// Runs a request's future to its end on the runtime, within the deadline.
    fn run<T>(
        &self,
        range: Range<u64>,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        let deadline = self.deadline;
        let reading = |kind: std::io::ErrorKind, why: String| {
            let what = format!(
                "reading bytes {}..{} of {}",
                range.start, range.end, self.url
            );
            Error::io(&what, None, std::io::Error::new(kind, why))
        };
        match runtime()?.block_on(async { tokio::time::timeout(deadline, request).await }) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(reading(io_kind(&e), e.to_string())),
            Err(_) => Err(reading(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {deadline:?}"),
            )),
        }
    }

    /// One ranged read of `buf.len()` bytes at `at`, of the version first seen.
    async fn read_part(&self, buf: &mut [u8], at: u64) -> object_store::Result<()> {
        let range = at..at + buf.len() as u64;
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            if_match: self.e_tag.clone(),
            ..GetOptions::default()
        };
        let _permit = self.limit.acquire().await;
        let bytes = self
            .store
            .get_opts(&self.location, options)
            .await?
            .bytes()
            .await?;
        if bytes.len() != buf.len() {
            return Err(object_store::Error::Generic {
                store: "tensorplace",
                source: format!(
                    "the server answered {} bytes for {} (the object ends before byte {}?)",
                    bytes.len(),
                    buf.len(),
                    range.end
                )
                .into(),
            });
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }
}

impl RangeSource for RemoteObject {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let range = offset..offset + buf.len() as u64;
        let part_size = self.part_size;
        self.run(range, async {
            let parts = buf
                .chunks_mut(part_size)
                .enumerate()
                .map(|(k, part)| self.read_part(part, offset + (k * part_size) as u64));
            futures::future::try_join_all(parts).await.map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        for url in [
            "s3://b/k.safetensors",
            "GS://b/k",
            "az://c/k",
            "https://h/p",
            "http://127.0.0.1:9/x",
        ] {
            assert!(is_url(Path::new(url)), "{url}");
        }
        for path in [
            "model.safetensors",
            "/data/s3://x",
            "s3:/b/k",
            "https://",
            "org/name",
        ] {
            assert!(!is_url(Path::new(path)), "{path}");
        }
    }
}
