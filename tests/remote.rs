//! Objects read over HTTP (`object_store`'s HTTP store, the code path every store shares):
//! a server on 127.0.0.1 started by each test, serving ranges of files from memory, and
//! misbehaving on purpose (failing, flaky, silent, cutting bodies short).
#![cfg(feature = "remote")]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tensorplace::remote::RemoteOptions;
use tensorplace::{Dtype, ErrorKind, Loader, ReadPath, Tensor, Tensors};

use crate::common;

/// How the server answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every range as asked.
    Good,
    /// The first request for each range after the first fails with 503 (the client retries).
    Flaky,
    /// Every request after the first fails with 500.
    Failing,
    /// Requests after the first are read and never answered.
    Silent,
    /// Answers after the first promise the whole range and send half of it.
    Cut,
    /// Every answer after the first takes 30 ms (requests overlap: their peak is counted).
    Slow,
}

/// A server of one object at `/o.safetensors`; requests counted.
struct Server {
    url: String,
    requests: Arc<Counts>,
}

/// The requests a server answered, and the ranges asked so far.
#[derive(Default)]
struct Counts {
    all: AtomicUsize,
    seen: std::sync::Mutex<std::collections::HashSet<Asked>>,
    /// Requests being answered now, and the most at once.
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// A request's range (`None`: the whole object).
type Asked = Option<(usize, Option<usize>)>;

fn serve(data: Vec<u8>, mode: Mode) -> Server {
    serve_all(vec![("/o.safetensors".to_owned(), data)], mode)
}

/// A server of `objects` (path, bytes); its URL names the first.
fn serve_all(objects: Vec<(String, Vec<u8>)>, mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}{}", listener.local_addr().unwrap(), objects[0].0);
    let requests = Arc::new(Counts::default());
    let objects: Arc<std::collections::HashMap<String, Vec<u8>>> =
        Arc::new(objects.into_iter().collect());
    let count = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (objects, count) = (objects.clone(), count.clone());
            std::thread::spawn(move || answer(stream, &objects, mode, &count));
        }
    });
    Server { url, requests }
}

/// Answers the requests of one connection.
fn answer(
    mut stream: TcpStream,
    objects: &std::collections::HashMap<String, Vec<u8>>,
    mode: Mode,
    count: &Counts,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let mut range = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.trim().split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
            }
        }
        let n = count.all.fetch_add(1, Ordering::SeqCst);
        let first_of_range = count.seen.lock().unwrap().insert(range);
        let respond = |stream: &mut TcpStream, status: &str, headers: String, body: &[u8]| {
            let head = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n",
                body.len()
            );
            stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(body))
        };
        let Some(data) = objects.get(&path) else {
            let _ = respond(&mut stream, "404 Not Found", String::new(), b"");
            continue;
        };
        match mode {
            Mode::Failing if n > 0 => {
                let _ = respond(
                    &mut stream,
                    "500 Internal Server Error",
                    String::new(),
                    b"no",
                );
                continue;
            }
            Mode::Flaky if n > 0 && first_of_range => {
                let _ = respond(
                    &mut stream,
                    "503 Service Unavailable",
                    String::new(),
                    b"busy",
                );
                continue;
            }
            Mode::Silent if n > 0 => {
                std::thread::sleep(Duration::from_secs(60));
                return;
            }
            _ => {}
        }
        let (start, end) = match range {
            Some((a, b)) => (a, b.map_or(data.len(), |b| (b + 1).min(data.len()))),
            None => (0, data.len()),
        };
        if start >= data.len() {
            let _ = respond(&mut stream, "416 Range Not Satisfiable", String::new(), b"");
            continue;
        }
        if mode == Mode::Slow && n > 0 {
            let now = count.now.fetch_add(1, Ordering::SeqCst) + 1;
            count.peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(30));
            count.now.fetch_sub(1, Ordering::SeqCst);
        }
        let body = &data[start..end];
        let headers = format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            end - 1,
            data.len()
        );
        if mode == Mode::Cut && n > 0 {
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\n{headers}Content-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..body.len() / 2]);
            return;
        }
        if respond(&mut stream, "206 Partial Content", headers, body).is_err() {
            return;
        }
    }
}

/// The command line run with `args`, which must succeed: its standard output.
fn cli(args: &[&str]) -> String {
    let out = crate::cli::run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file of `count` tensors of mixed dtypes and sizes, as bytes and as tensors.
fn object(count: usize, big: usize) -> (Vec<u8>, Tensors) {
    let mut t = Tensors::new();
    for k in 0..count {
        let n = if k % 7 == 3 {
            big + k
        } else {
            1 + k * 13 % 997
        };
        let dtype = [Dtype::U8, Dtype::F16, Dtype::F32][k % 3];
        let bytes = common::bytes(n * dtype.bits() / 8, k as u64);
        t.insert(
            format!("t{k:05}"),
            Tensor::from_bytes(dtype, vec![n], &bytes).unwrap(),
        );
    }
    (tensorplace::save(&t, None).unwrap(), t)
}

fn options(part_size: usize, retries: usize, timeout_s: u64) -> RemoteOptions {
    RemoteOptions {
        options: Vec::new(),
        part_size,
        retries,
        timeout: Duration::from_secs(timeout_s),
        ..RemoteOptions::default()
    }
}

fn assert_same(got: &Tensors, want: &Tensors, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (name, t) in want.iter() {
        let g = got.tensor(name).unwrap();
        assert_eq!(
            (g.dtype(), g.shape()),
            (t.dtype(), t.shape()),
            "{what} {name}"
        );
        assert!(
            g.host_bytes().unwrap() == t.host_bytes().unwrap(),
            "{what} {name}"
        );
    }
}

/// Whole loads over HTTP equal the local load on every device, with parts smaller than
/// the engine's pieces (several reads per piece) and larger; a header longer than the first
/// read's guess takes a second; a reader and a stream read the same tensors lazily.
#[test]
fn objects_over_http_load_as_local_files_do() {
    let (data, want) = object(60, 1 << 20);
    let order: Vec<String> = tensorplace::load(&data, "cpu")
        .unwrap()
        .names()
        .map(str::to_owned)
        .collect();
    let server = serve(data, Mode::Good);
    for device in common::devices("objects_over_http_load_as_local_files_do") {
        for part in [256 << 10, 16 << 20] {
            let got = Loader::new(device)
                .remote(options(part, 3, 30))
                .load_file(&server.url)
                .unwrap();
            assert_eq!(got.report().unwrap().read, ReadPath::Pread);
            assert_same(&got, &want, &format!("{device} part {part}"));
        }
    }
    let loader = Loader::new("cpu").remote(options(1 << 20, 3, 30));
    let reader = loader.reader(&server.url).unwrap();
    for name in ["t00003", "t00059", "t00000"] {
        let got = reader.tensor(name).unwrap();
        assert_eq!(
            got.host_bytes().unwrap(),
            want.tensor(name).unwrap().host_bytes().unwrap()
        );
    }
    let streamed: Vec<String> = loader
        .stream(&server.url, 4 << 20)
        .unwrap()
        .map(|item| item.unwrap().0)
        .collect();
    assert_eq!(streamed, order, "file order");
    // A header of 20,000 names: longer than the first read.
    let (data, want) = object(20_000, 10);
    assert!(u64::from_le_bytes(data[..8].try_into().unwrap()) > tensorplace::remote::GUESS);
    let server = serve(data, Mode::Good);
    let got = Loader::new("cpu")
        .remote(options(1 << 20, 3, 30))
        .load_file(&server.url)
        .unwrap();
    assert_same(&got, &want, "long header");
}

/// Transient failures are retried; a failing, silent or cutting server, a missing object
/// and an unknown option are errors naming the URL (and, for data, the tensor), in bounded
/// time.
#[test]
fn failing_servers_are_errors_not_hangs() {
    let (data, want) = object(30, 300 << 10);
    let flaky = serve(data.clone(), Mode::Flaky);
    let got = Loader::new("cpu")
        .remote(options(64 << 10, 3, 10))
        .load_file(&flaky.url)
        .unwrap();
    assert_same(&got, &want, "flaky");
    let seen = flaky.requests.seen.lock().unwrap().len();
    assert!(
        flaky.requests.all.load(Ordering::SeqCst) >= 2 * seen - 1,
        "each range retried"
    );
    for mode in [Mode::Failing, Mode::Silent, Mode::Cut] {
        let server = serve(data.clone(), mode);
        let started = Instant::now();
        let e = Loader::new("cpu")
            .remote(options(1 << 20, 1, 2))
            .load_file(&server.url)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().contains(&server.url), "{e}");
        assert!(e.tensor().is_some(), "the tensor is named: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
    let server = serve(data, Mode::Good);
    let missing = server.url.replace("o.safetensors", "absent.safetensors");
    let e = Loader::new("cpu")
        .remote(options(1 << 20, 0, 5))
        .load_file(&missing)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("absent.safetensors"), "{e}");
    let mut bad = options(1 << 20, 0, 5);
    bad.options.push(("no_such_option".into(), "1".into()));
    let e = Loader::new("cpu")
        .remote(bad)
        .load_file(&server.url)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

/// The CLI loads and converts an object by URL.
#[test]
fn the_cli_loads_converts_and_inspects_urls() {
    if crate::cli::skip_without_cli("the_cli_loads_converts_and_inspects_urls") {
        return;
    }
    let (data, want) = object(20, 100 << 10);
    let server = serve(data.clone(), Mode::Good);
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("copy.safetensors");
    for args in [
        vec!["load", server.url.as_str(), "--device", "cpu"],
        vec![
            "convert",
            server.url.as_str(),
            out_path.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    ] {
        cli(&args);
    }
    assert_same(
        &tensorplace::load_file(&out_path, "cpu").unwrap(),
        &want,
        "converted",
    );
    // inspect: the object's header and each tensor's hash, as the same bytes on disk give.
    let local = dir.path().join("local.safetensors");
    std::fs::write(&local, &data).unwrap();
    let inspect = |file: &str, json: bool| {
        let mut args = vec!["inspect", file, "--hash"];
        args.extend(json.then_some("--json"));
        cli(&args)
    };
    let tensors = |text: &str| {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        for t in v["tensors"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("file");
        }
        v["tensors"].clone()
    };
    let (remote, on_disk) = (
        inspect(&server.url, true),
        inspect(local.to_str().unwrap(), true),
    );
    assert_eq!(tensors(&remote), tensors(&on_disk));
    assert_eq!(tensors(&remote).as_array().unwrap().len(), want.len());
    let text = inspect(&server.url, false);
    assert!(
        text.starts_with(&format!("{}: {} bytes", server.url, data.len())),
        "{text}"
    );
}

/// The limit on ranged reads in flight is each load's own (loads asking the same limit share
/// it), whatever objects the process opened before: a load asking for 2 never has more than
/// 2 in flight, one asking for 8 has more than 2.
#[test]
fn each_load_keeps_its_limit_on_reads_in_flight() {
    let (data, want) = object(24, 200 << 10);
    for concurrency in [2, 8] {
        let server = serve(data.clone(), Mode::Slow);
        let remote = RemoteOptions {
            concurrency,
            ..options(64 << 10, 1, 10)
        };
        let got = Loader::new("cpu").remote(remote).load_file(&server.url);
        assert_same(&got.unwrap(), &want, "slow server");
        let peak = server.requests.peak.load(Ordering::SeqCst);
        assert!(
            peak <= concurrency,
            "{peak} in flight, {concurrency} allowed"
        );
        assert!(
            concurrency == 2 || peak > 2,
            "{peak} in flight, {concurrency} allowed"
        );
    }
}

/// A sharded checkpoint by its index's URL: one plan over the shards it names, equal to the
/// local load; a reader of it; a shard the server lacks is the index's error.
#[test]
fn remote_indexes_load_as_checkpoints() {
    let sharded = common::fixtures().join("sharded");
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(&sharded).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        objects.push((format!("/ckpt/{name}"), std::fs::read(&path).unwrap()));
    }
    objects.sort_by_key(|(name, _)| !name.ends_with(".index.json"));
    let want = tensorplace::load_file(&sharded, "cpu").unwrap();
    let server = serve_all(objects.clone(), Mode::Good);
    assert!(
        server.url.ends_with(tensorplace::INDEX_NAME),
        "{}",
        server.url
    );
    let loader = Loader::new("cpu").remote(options(1 << 20, 1, 10));
    assert_same(
        &loader.load_file(&server.url).unwrap(),
        &want,
        "remote index",
    );
    let reader = loader.reader(&server.url).unwrap();
    assert_eq!(reader.names().count(), want.len());
    let (name, t) = want.iter().last().unwrap();
    assert_eq!(
        reader.tensor(name).unwrap().host_bytes().unwrap(),
        t.host_bytes().unwrap()
    );
    // The command line's inspect of the index's URL: every shard, every tensor.
    if !crate::cli::skip_without_cli("remote_indexes_load_as_checkpoints (inspect)") {
        let v: serde_json::Value =
            serde_json::from_str(&cli(&["inspect", &server.url, "--json"])).unwrap();
        assert_eq!(v["tensor_count"], want.len());
        assert_eq!(v["files"].as_array().unwrap().len(), 4);
    }
    objects.retain(|(name, _)| !name.contains("00002"));
    let server = serve_all(objects, Mode::Good);
    let e = loader.load_file(&server.url).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIndex, "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
}

/// An HTTPS store builds its TLS client (rustls on ring, installed at first use): a closed
/// port is a refused connection, not a client that could not be built. (Here, not among the
/// library's unit tests: the unit test binary then links no network stack.)
#[test]
fn https_clients_build_and_fail_cleanly() {
    let e = Loader::new("cpu")
        .remote(options(1 << 20, 0, 5))
        .load_file("https://127.0.0.1:9/x.safetensors")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(!e.to_string().contains("builder error"), "{e}");
}
