//! `tensorplace`: inspect, load, convert and benchmark safetensors files on any device.
//!
//! `main` calls `try_main` and turns its error into one line on stderr and an exit status
//! (2 for bad input, 1 for device trouble); a closed stdout (`| head`) ends the program
//! quietly. The flags and environment variables are read here and mapped onto the
//! library's `Loader` options; the library itself reads no environment.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use tensorplace::internals::{
    Conversion, HostFile, TensorInfo, is_multi_file, list_devices, open_checkpoint, open_host_file,
    write_atomically,
};
use tensorplace::{
    Device, Dtype, Error, ErrorKind, Loader, ReadMode, ReadPath, Result, Slice, Tensors, Upload,
};
use tensorplace_bench::{self as bench, BenchArgs};

#[derive(Parser)]
#[command(
    name = "tensorplace",
    version,
    about = "Load safetensors files straight onto CPU, CUDA or wgpu devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a file's (or a checkpoint's) metadata and tensors, in file order.
    Inspect(InspectArgs),
    /// Load a file or checkpoint onto a device and report the speed (a demo checkpoint
    /// without FILE).
    Load(LoadArgs),
    /// Load, optionally cast every floating tensor, and save: a file to a file, or a
    /// sharded checkpoint to a folder of the same shards and an index.
    Convert(ConvertArgs),
    /// Benchmark loads against their baselines and ceilings in one run.
    Bench(BenchArgs),
    /// List CUDA devices, wgpu adapters and the CPU.
    Devices,
}

#[derive(Args)]
struct InspectArgs {
    /// The safetensors file, or a checkpoint: a folder of shards or its index; an object's
    /// URL (s3://, gs://, az://, http(s)://) or a Hugging Face cache id (org/name[@rev]).
    file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Add each tensor's SHA-256.
    #[arg(long)]
    hash: bool,
}

/// How tensors reach the device: the `Loader` options a command maps its flags onto.
#[derive(Args)]
struct DeviceArgs {
    /// cpu, cuda, cuda:N, gpu, gpu:N, wgpu, wgpu:N or auto.
    #[arg(long, short, default_value = "auto")]
    device: Device,
    /// How tensors go up to a GPU: auto, register, staging, in-place or host-import. Default: the
    /// device's variable, TENSORPLACE_CUDA_UPLOAD or TENSORPLACE_WGPU_UPLOAD, else auto.
    #[arg(long)]
    upload: Option<Upload>,
    /// For --device wgpu: the first adapter whose name contains this.
    #[arg(long, env = "WGPU_ADAPTER_NAME")]
    adapter: Option<String>,
    /// Read with pread instead of mapping the file.
    #[arg(long, conflicts_with = "direct")]
    pread: bool,
    /// Read with O_DIRECT, past the page cache (for files not in it).
    #[arg(long)]
    direct: bool,
    /// Cast every floating tensor to this dtype on the device.
    #[arg(long)]
    dtype: Option<Dtype>,
}

impl DeviceArgs {
    /// The loader these flags (and the upload variables) describe.
    fn loader<'a>(&self) -> Result<Loader<'a>> {
        let mut loader = Loader::new(self.device).upload(self.upload()?);
        if let Some(name) = &self.adapter {
            loader = loader.adapter(name.clone());
        }
        if let Some(d) = self.dtype {
            loader = loader.dtype(d);
        }
        Ok(loader.read_mode(self.read_mode()))
    }

    /// `--upload`, else the variable of the device the load will use.
    fn upload(&self) -> Result<Upload> {
        if let Some(u) = self.upload {
            return Ok(u);
        }
        let var = match self.device.probe() {
            Ok(Device::Cuda(_)) => "TENSORPLACE_CUDA_UPLOAD",
            Ok(Device::Wgpu(_)) => "TENSORPLACE_WGPU_UPLOAD",
            _ => return Ok(Upload::Auto),
        };
        match std::env::var(var) {
            Ok(v) => v
                .parse()
                .map_err(|e: Error| Error::new(e.kind(), format!("{var}: {}", e.message()))),
            Err(_) => Ok(Upload::Auto),
        }
    }

    fn read_mode(&self) -> ReadMode {
        match (self.pread, self.direct) {
            (true, _) => ReadMode::Pread,
            (_, true) => ReadMode::Direct,
            _ => ReadMode::Mmap,
        }
    }
}

#[derive(Args)]
struct LoadArgs {
    /// The safetensors file, or a checkpoint (a folder of shards or its index); without it
    /// a ~1 GiB demo checkpoint is written first.
    file: Option<PathBuf>,
    #[command(flatten)]
    target: DeviceArgs,
    /// Load only this part of a tensor, such as `model.embed_tokens.weight[0:128, :]`
    /// (safetensors' get_slice rules); repeatable. With it, only the tensors named load.
    #[arg(long = "slice", value_name = "NAME[SLICE]", value_parser = parse_named_slice)]
    slices: Vec<(String, Slice)>,
    /// Tensor parallelism: load part RANK of WORLD of every tensor that has dimension DIM
    /// (0 unless given), cut as numpy.array_split cuts: `--part 3/8` or `--part 3/8:1`.
    #[arg(long, value_name = "RANK/WORLD[:DIM]", value_parser = parse_part)]
    part: Option<(usize, usize, usize)>,
    /// Read every tensor back and compare it with the file.
    #[arg(long)]
    verify: bool,
    /// On the CPU, view the mapped file instead of copying it (zero-copy; the file must not
    /// change while the command runs).
    #[arg(long)]
    mapped: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// The input file, or a checkpoint (a folder of shards or its index).
    input: PathBuf,
    /// The output file; for a checkpoint, the output folder (each shard written
    /// atomically under its own name, then the index).
    output: PathBuf,
    /// Write OUTPUT as a folder of shards of at most SIZE bytes of tensors each (5GB,
    /// 500MB: huggingface_hub's units and split; model.safetensors alone where one is enough),
    /// with model.safetensors.index.json; nothing in the folder changes unless every file
    /// was written.
    #[arg(long, value_name = "SIZE", value_parser = parse_shard_size)]
    max_shard_size: Option<u64>,
    #[command(flatten)]
    target: DeviceArgs,
}

fn parse_shard_size(text: &str) -> std::result::Result<u64, String> {
    tensorplace::parse_size(text).map_err(|e| e.message().to_owned())
}

/// Set by the interrupt handler once a Ctrl-C (or SIGTERM) has arrived.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() -> ExitCode {
    quiet_vulkan_device_select();
    // A bug in this program prints one line, like every error, whatever RUST_BACKTRACE says.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("tensorplace: internal error (please report it): {info}");
    }));
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        // The interrupt handler removed the temporary this command was writing (so its
        // rename, say, failed) and is exiting with 130: that is the outcome, not this error.
        Err(_) if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("tensorplace: {}", one_line(&e.to_string()));
            match e.kind() {
                ErrorKind::Backend | ErrorKind::OutOfMemory => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

/// Mesa's implicit Vulkan layer `VK_LAYER_MESA_device_select`, which every Mesa install
/// enables, connects to Wayland while devices are enumerated to find the default one, and
/// libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` on
/// stderr where that variable is unset (a container, a CI job, `sudo`), as if it were ours.
/// The layer only reorders devices, which `wgpu:N` orders itself; its documented switch
/// `NODEVICE_SELECT` turns it off, unless the user has set it.
fn quiet_vulkan_device_select() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: the first thing `main` does: no other thread exists yet that could read or
        // write the environment at the same time.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

fn try_main() -> Result<()> {
    // Blocked from the first instant, so that a Ctrl-C during start-up cannot kill a
    // `convert` before it can clean up; every other command unblocks them at once.
    let interrupts = Interrupts::block()?;
    raise_open_file_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return Ok(());
        }
        Err(e) => return Err(usage_error(e)),
    };
    let mut command = cli.command;
    // A FILE that is not on disk may be a repository id of the Hugging Face cache.
    let cache = tensorplace::hub::default_cache_dir();
    let locate = |path: &mut PathBuf| -> Result<()> {
        *path = tensorplace::hub::locate(path, cache.as_deref())?.into_owned();
        Ok(())
    };
    match &mut command {
        Command::Convert(args) => locate(&mut args.input)?,
        Command::Inspect(args) => locate(&mut args.file)?,
        Command::Load(args) => args.file.as_mut().map_or(Ok(()), locate)?,
        Command::Bench(_) | Command::Devices => {}
    }
    match command {
        Command::Convert(args) => convert(&args, interrupts),
        Command::Inspect(args) => interrupts.unblock().and_then(|()| inspect(&args)),
        Command::Load(args) => interrupts.unblock().and_then(|()| load(&args)),
        Command::Bench(args) => interrupts.unblock().and_then(|()| bench::run(&args)),
        Command::Devices => interrupts.unblock().and_then(|()| devices()),
    }
}

/// Raises this process's soft limit on open files to its hard limit: a load keeps one
/// descriptor per shard open (two for shards read directly), and checkpoints of more than
/// about 500 shards pass the common soft limit of 1,024. The library leaves the limit to its
/// application; this tool is one. Where the kernel refuses, the limit stays as it was.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit through valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Command-line misuse as one line: the kind of the value's own error where a value was
/// refused (an unknown device string, say), else `Unsupported`; both exit with status 2.
fn usage_error(e: clap::Error) -> Error {
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    let kind = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<Error>())
        .map_or(ErrorKind::Unsupported, Error::kind);
    Error::new(kind, first).with_source(e)
}

/// Whether the error is a write to a closed pipe (the reader went away: not a failure).
fn is_broken_pipe(e: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::BrokenPipe;
        }
        source = s.source();
    }
    false
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes a line to stdout; a failure (a closed pipe) is an error with its cause.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| Error::io("writing to stdout", None, e))
    };
}

fn devices() -> Result<()> {
    for line in list_devices() {
        out!("{line}")?;
    }
    Ok(())
}

fn inspect(args: &InspectArgs) -> Result<()> {
    if args.json {
        return out!("{}", inspect_json(args)?);
    }
    if !is_multi_file(&args.file) {
        return inspect_file(args, &args.file);
    }
    let ckpt = open_checkpoint(&args.file)?;
    let total = ckpt
        .total_size()
        .map_or(String::new(), |t| format!(" (index total_size {t})"));
    out!(
        "{}: {} files, {} tensors, {} data bytes{total}",
        ckpt.path().display(),
        ckpt.files().len(),
        ckpt.len(),
        ckpt.data_len()
    )?;
    if let Some(md) = ckpt.index_metadata() {
        out!("index metadata:")?;
        for (k, v) in md {
            out!("  {k}: {v}")?;
        }
    }
    for file in ckpt.files() {
        out!("")?;
        inspect_file(args, file)?;
    }
    Ok(())
}

/// `inspect --json`: one schema for a file and a checkpoint (README, Command line):
/// `{path, metadata, index_metadata, total_size, tensor_count, data_bytes, files: [{file,
/// metadata, header_bytes, tensor_count, data_bytes}], tensors: [{name, dtype, shape,
/// data_offsets, file[, sha256]}]}`, tensors in file order, file after file.
fn inspect_json(args: &InspectArgs) -> Result<serde_json::Value> {
    let (path, paths, metadata, index_metadata, total_size) = if is_multi_file(&args.file) {
        let ckpt = open_checkpoint(&args.file)?;
        let paths: Vec<PathBuf> = ckpt.files().map(Path::to_path_buf).collect();
        let md = |m: Option<&tensorplace::Metadata>| m.cloned();
        (
            ckpt.path().to_path_buf(),
            paths,
            md(ckpt.metadata()),
            md(ckpt.index_metadata()),
            ckpt.total_size(),
        )
    } else {
        let file = open_host_file(&args.file, ReadMode::Mmap)?;
        let md = file.header().metadata().cloned();
        (args.file.clone(), vec![args.file.clone()], md, None, None)
    };
    let (mut files, mut tensors, mut data_bytes) = (Vec::new(), Vec::new(), 0u64);
    for path in &paths {
        let file = open_host_file(path, ReadMode::Mmap)?;
        let header = file.header();
        for (name, info) in file.tensors() {
            let mut entry = serde_json::json!({
                "name": name,
                "dtype": info.dtype.name(),
                "shape": info.shape,
                "data_offsets": [info.data_offsets.0, info.data_offsets.1],
                "file": path,
            });
            if args.hash {
                entry["sha256"] = digest(&file, name, info)?.into();
            }
            tensors.push(entry);
        }
        data_bytes += header.data_len() as u64;
        files.push(serde_json::json!({
            "file": path,
            "metadata": header.metadata(),
            "header_bytes": header.header_len(),
            "tensor_count": header.tensors().len(),
            "data_bytes": header.data_len(),
        }));
    }
    Ok(serde_json::json!({
        "path": path,
        "metadata": metadata,
        "index_metadata": index_metadata,
        "total_size": total_size,
        "tensor_count": tensors.len(),
        "data_bytes": data_bytes,
        "files": files,
        "tensors": tensors,
    }))
}

/// Each tensor's SHA-256, hashed in 8 MiB pieces so that a tensor of any size needs no
/// more memory than that.
fn digest(file: &HostFile<'_>, name: &str, info: &TensorInfo) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; info.len().min(8 << 20)];
    let range = file.header().file_range(info);
    for at in range.clone().step_by(8 << 20) {
        let n = buf.len().min(range.end - at);
        file.read_at(at, &mut buf[..n])
            .map_err(|e| e.with_tensor(name))?;
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Prints one file.
fn inspect_file(args: &InspectArgs, path: &Path) -> Result<()> {
    let file = open_host_file(path, ReadMode::Mmap)?;
    out!(
        "{}: {} bytes, header {} bytes, {} tensors, {} data bytes",
        path.display(),
        file.len(),
        file.header().header_len(),
        file.header().tensors().len(),
        file.header().data_len()
    )?;
    if let Some(md) = file.header().metadata() {
        out!("metadata:")?;
        for (k, v) in md {
            out!("  {k}: {v}")?;
        }
    }
    for (name, info) in file.tensors() {
        let (b, e) = info.data_offsets;
        let mut line = format!("{name}\t{}\t{:?}\t[{b}, {e}]", info.dtype, info.shape);
        if args.hash {
            line.push('\t');
            line.push_str(&digest(&file, name, info)?);
        }
        out!("{line}")?;
    }
    Ok(())
}

/// Parses `RANK/WORLD[:DIM]`, such as `3/8` or `3/8:1`.
fn parse_part(s: &str) -> std::result::Result<(usize, usize, usize), String> {
    let bad = || format!("{s:?}: expected RANK/WORLD or RANK/WORLD:DIM, such as 3/8");
    let (part, dim) = s.split_once(':').unwrap_or((s, "0"));
    let (rank, world) = part.split_once('/').ok_or_else(bad)?;
    let n = |t: &str| t.trim().parse::<usize>().map_err(|_| bad());
    Ok((n(rank)?, n(world)?, n(dim)?))
}

/// Parses `NAME[SLICE]`, such as `model.embed_tokens.weight[0:128, :]`.
fn parse_named_slice(s: &str) -> std::result::Result<(String, Slice), String> {
    let open = s
        .find('[')
        .ok_or_else(|| format!("{s:?}: expected NAME[SLICE], such as w[0:128, :]"))?;
    let (name, slice) = s.split_at(open);
    let slice = slice.parse::<Slice>().map_err(|e| e.to_string())?;
    Ok((name.to_owned(), slice))
}

/// A progress bar on stderr that appears only on a terminal and only after a second.
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Writes the demo checkpoint into `dir` and says so on stderr.
fn write_demo(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("demo.safetensors");
    let t = Instant::now();
    let spec = bench::Synthetic::demo();
    bench::write_synthetic(&path, &spec)?;
    eprintln!(
        "wrote a demo checkpoint: {} tensors, {} bytes, in {:.2} s ({})",
        spec.tensors,
        std::fs::metadata(&path).map_or(0, |m| m.len()),
        t.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(path)
}

fn load(args: &LoadArgs) -> Result<()> {
    // Fail on an unusable device before writing a demo checkpoint.
    let description = args.target.loader()?.describe()?;
    let demo_dir =
        tempfile::tempdir().map_err(|e| Error::io("creating a temporary folder", None, e))?;
    let path = match &args.file {
        Some(p) => p.clone(),
        None => write_demo(demo_dir.path())?,
    };
    let bar = progress_bar();
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let loader = selection(args, args.target.loader()?).progress(|p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        if terminal && bar.is_hidden() && started.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    });
    let t = Instant::now();
    let tensors = if args.mapped {
        // SAFETY: the user asked for views of the mapping with --mapped, whose help states
        // the contract: the file does not change while this command runs. The tensors are
        // dropped before it ends.
        unsafe { loader.load_file_mapped(&path) }?
    } else {
        loader.load_file(&path)?
    };
    let secs = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let bytes: usize = tensors.total_bytes();
    let report = tensors.report();
    if report.is_some_and(|r| r.read == ReadPath::Views) {
        out!(
            "mapped {} tensors onto {description} in {:.3} s (zero-copy views, nothing copied)",
            tensors.len(),
            secs
        )?;
    } else {
        out!(
            "loaded {} tensors, {} bytes onto {description} in {:.3} s: {:.2} GB/s",
            tensors.len(),
            bytes,
            secs,
            bytes as f64 / secs / 1e9
        )?;
    }
    if let Some(r) = report {
        let up = r.upload.map_or(String::new(), |u| format!("; up: {u}"));
        out!("path: {}{up}", r.read)?;
        for note in &r.notes {
            out!("note: {note}")?;
        }
    }
    if args.verify {
        let reference = selection(args, Loader::new(Device::Cpu).read_mode(ReadMode::Pread));
        let checked = verify(&path, reference, &tensors)?;
        out!("verified: every tensor read back equals the file ({checked} bytes)")?;
    }
    Ok(())
}

/// The loader with the parts `load` asks for: `--slice` (only the tensors named) and
/// `--part`.
fn selection<'a>(args: &LoadArgs, mut loader: Loader<'a>) -> Loader<'a> {
    if !args.slices.is_empty() {
        let names: Vec<String> = args.slices.iter().map(|(n, _)| n.clone()).collect();
        loader = loader.filter(move |n| names.iter().any(|m| m == n));
        for (name, slice) in &args.slices {
            loader = loader.slice(name.clone(), slice.clone());
        }
    }
    if let Some((rank, world, dim)) = args.part {
        loader = loader.split(rank, world, move |_, shape| {
            (shape.len() > dim).then_some(dim)
        });
    }
    loader
}

/// Compares every loaded tensor, read back, with what `reference` (the same selection, on
/// the CPU with positioned reads) loads, converted on the CPU where the load converted
/// them. Returns the bytes compared.
fn verify(path: &Path, reference: Loader<'_>, tensors: &Tensors) -> Result<usize> {
    let reference = reference.load_file(path)?;
    let mut checked = 0usize;
    for (name, tensor) in tensors.iter() {
        let want = reference.tensor(name)?;
        let mut want_bytes = want.host_bytes()?.into_owned();
        if let Some(c) = Conversion::between(want.dtype(), tensor.dtype()) {
            let mut out = vec![0u8; c.output_len(want_bytes.len()).unwrap_or(0)];
            c.convert(&want_bytes, &mut out);
            want_bytes = out;
        }
        let got = tensor.host_bytes().map_err(|e| e.with_tensor(name))?;
        if *got != want_bytes[..] || tensor.shape() != want.shape() {
            return Err(Error::new(
                ErrorKind::Backend,
                "the bytes read back differ from the file's",
            )
            .with_tensor(name)
            .with_file(path));
        }
        checked += got.len();
    }
    Ok(checked)
}

fn convert(args: &ConvertArgs, interrupts: Interrupts) -> Result<()> {
    if let Some(max) = args.max_shard_size {
        return convert_to_shards(args, max, interrupts);
    }
    if !is_multi_file(&args.input) {
        interrupts.clean_up_on_interrupt(vec![args.output.clone()]);
        let tensors = args.target.loader()?.load_file(&args.input)?;
        return tensorplace::save_file(&tensors, &args.output, None);
    }
    let ckpt = tensorplace::open(&args.input)?;
    let out_dir = &args.output;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io("creating the output folder", Some(out_dir), e))?;
    let index_path = out_dir.join(tensorplace::INDEX_NAME);
    let names: Vec<&std::ffi::OsStr> = ckpt.files().filter_map(|f| f.file_name()).collect();
    let mut targets: Vec<PathBuf> = names.iter().map(|n| out_dir.join(n)).collect();
    targets.push(index_path.clone());
    interrupts.clean_up_on_interrupt(targets);
    let loader = args.target.loader()?;
    // One shard at a time, so that memory holds one shard; the index last.
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (file, name) in ckpt.files().zip(&names) {
        let tensors = loader.load_file(file)?;
        total += tensors.total_bytes() as u64;
        let shard = name.to_string_lossy().into_owned();
        for tensor in tensors.names() {
            weight_map.insert(tensor.to_owned(), shard.clone().into());
        }
        tensorplace::save_file(&tensors, out_dir.join(name), None)?;
    }
    let mut metadata = serde_json::Map::new();
    for (k, v) in ckpt.index_metadata().into_iter().flatten() {
        metadata.insert(k.clone(), v.clone().into());
    }
    metadata.insert("total_size".into(), total.into());
    let index = serde_json::json!({"metadata": metadata, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
    write_atomically(&index_path, |w| {
        w.write_all(text.as_bytes())
            .and_then(|()| w.write_all(b"\n"))
            .map_err(|e| Error::io("writing", None, e))
    })
    .map_err(|e| e.with_file(&index_path))
}

/// `convert --max-shard-size`: the input (a file or a checkpoint) written as a checkpoint of
/// shards split as huggingface_hub splits, in the input's order, one output shard's tensors
/// in memory at a time; every shard written before any is put in place, the index last.
fn convert_to_shards(args: &ConvertArgs, max: u64, interrupts: Interrupts) -> Result<()> {
    let reader = args.target.loader()?.reader(&args.input)?;
    let names: Vec<&str> = reader.names().collect();
    let sizes = names
        .iter()
        .map(|&name| {
            let (dtype, shape) = reader.info(name)?;
            let out = match args.target.dtype {
                Some(to) if dtype.is_float() => to,
                _ => dtype,
            };
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = numel.and_then(|n| out.bytes_for(n)).ok_or_else(|| {
                Error::new(ErrorKind::SizeOverflow, "the tensor's size").with_tensor(name)
            })?;
            Ok((name, bytes as u64))
        })
        .collect::<Result<Vec<_>>>()?;
    let split = tensorplace::ShardSplit::new(sizes, max);
    let mut writer =
        tensorplace::CheckpointWriter::new(&args.output, split, reader.metadata().cloned())?;
    interrupts.clean_up_on_interrupt(writer.paths());
    while let Some((_, names)) = writer.next_shard() {
        let tensors = reader.tensors(names.iter().map(String::as_str))?;
        writer.write_shard(&tensors)?;
    }
    writer.finish().map(drop)
}

/// SIGINT and SIGTERM, blocked in the main thread (and so in every thread it starts later).
struct Interrupts(libc::sigset_t);

impl Interrupts {
    /// Blocks SIGINT and SIGTERM in this thread; call it before any other thread starts.
    fn block() -> Result<Interrupts> {
        // SAFETY: `sigset_t` is plain data that sigemptyset initializes before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; these calls only write to it and to this
        // thread's signal mask.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        Interrupts::check(rc, "blocking SIGINT")?;
        Ok(Interrupts(set))
    }

    /// Unblocks them: their default action (ending the process) applies again, at once to
    /// one that arrived meanwhile.
    fn unblock(self) -> Result<()> {
        // SAFETY: `self.0` is a valid sigset_t; the call only changes this thread's mask.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut()) };
        Interrupts::check(rc, "unblocking SIGINT")
    }

    fn check(rc: i32, what: &str) -> Result<()> {
        match rc {
            0 => Ok(()),
            rc => Err(Error::io(what, None, std::io::Error::from_raw_os_error(rc))),
        }
    }

    /// On Ctrl-C (SIGINT) or SIGTERM, one arrived already included, removes the temporaries
    /// this process is writing beside the `outputs` (each output itself is only ever
    /// replaced whole, by a rename) and exits with status 130. The process's writes are held
    /// first: none creates or renames a temporary after they are removed, so each output is
    /// its old file (or absent) or, where its rename came first, the new one whole.
    fn clean_up_on_interrupt(self, outputs: Vec<PathBuf>) {
        let set = self.0;
        std::thread::spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` holds the blocked signals; sigwait writes the one received.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
                let _held = tensorplace::internals::hold_writes();
                for output in &outputs {
                    tensorplace::internals::remove_temporaries(output, std::process::id());
                }
                let names: Vec<String> = outputs.iter().map(|p| p.display().to_string()).collect();
                eprintln!(
                    "tensorplace: interrupted; {} left as it was",
                    names.join(", ")
                );
                std::process::exit(130);
            }
        });
    }
}
