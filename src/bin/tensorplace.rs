//! `tensorplace`: inspect, load, convert and benchmark safetensors files on any device.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use tensorplace::bench::{self, BenchArgs};
use tensorplace::{Device, Dtype, Error, ErrorKind, HostFile, Loader, ReadMode, Result};

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
    /// Print a file's metadata and tensors, in file order.
    Inspect {
        /// The safetensors file.
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Add each tensor's SHA-256.
        #[arg(long)]
        hash: bool,
    },
    /// Load a file onto a device and report the speed (a demo checkpoint without FILE).
    Load {
        /// The safetensors file; without it a ~1 GiB demo checkpoint is written first.
        file: Option<PathBuf>,
        /// cpu, cuda, cuda:N, gpu, gpu:N, wgpu, wgpu:N or auto.
        #[arg(long, short, default_value = "auto")]
        device: String,
        /// Read every tensor back and compare it with the file.
        #[arg(long)]
        verify: bool,
        /// Cast every floating tensor to this dtype on the device.
        #[arg(long)]
        dtype: Option<Dtype>,
        /// Read with pread instead of mapping the file.
        #[arg(long)]
        pread: bool,
    },
    /// Load, optionally cast every floating tensor, and save.
    Convert {
        /// The input file.
        input: PathBuf,
        /// The output file (written atomically).
        output: PathBuf,
        /// Cast every floating tensor to this dtype.
        #[arg(long)]
        dtype: Option<Dtype>,
        /// The device that does the casting.
        #[arg(long, short, default_value = "cpu")]
        device: String,
    },
    /// Benchmark loads against their baselines and ceilings in one run.
    Bench(BenchArgs),
    /// List CUDA devices, wgpu adapters and the CPU.
    Devices,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { file, json, hash } => inspect(&file, json, hash),
        Command::Load {
            file,
            device,
            verify,
            dtype,
            pread,
        } => load(file, &device, verify, dtype, pread),
        Command::Convert {
            input,
            output,
            dtype,
            device,
        } => convert(&input, &output, dtype, &device),
        Command::Bench(args) => bench::run(&args),
        Command::Devices => {
            for line in tensorplace::device::list() {
                println!("{line}");
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tensorplace: {}", one_line(&e.to_string()));
            match e.kind() {
                ErrorKind::Backend | ErrorKind::OutOfMemory => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn inspect(path: &Path, json: bool, hash: bool) -> Result<()> {
    let file = HostFile::open(path, ReadMode::Mmap)?;
    // Hashed in 8 MiB pieces, so that a tensor of any size needs no more memory than that.
    let digest = |name: &str, info: &tensorplace::TensorInfo| -> Result<String> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; info.len().min(8 << 20)];
        for at in file.header().file_range(info).step_by(8 << 20) {
            let n = buf.len().min(file.header().file_range(info).end - at);
            file.read_at(at, &mut buf[..n])
                .map_err(|e| e.with_tensor(name))?;
            hasher.update(&buf[..n]);
        }
        Ok(format!("{:x}", hasher.finalize()))
    };
    if json {
        let mut tensors = Vec::with_capacity(file.header().tensors().len());
        for (name, info) in file.tensors() {
            let mut entry = serde_json::json!({
                "name": name,
                "dtype": info.dtype.name(),
                "shape": info.shape,
                "data_offsets": [info.data_offsets.0, info.data_offsets.1],
            });
            if hash {
                entry["sha256"] = digest(name, info)?.into();
            }
            tensors.push(entry);
        }
        let out = serde_json::json!({
            "metadata": file.header().metadata(),
            "tensors": tensors,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "{}: {} bytes, header {} bytes, {} tensors, {} data bytes",
        path.display(),
        file.len(),
        file.header().header_len(),
        file.header().tensors().len(),
        file.header().data_len()
    );
    if let Some(md) = file.header().metadata() {
        println!("metadata:");
        for (k, v) in md {
            println!("  {k}: {v}");
        }
    }
    for (name, info) in file.tensors() {
        let (b, e) = info.data_offsets;
        let mut line = format!("{name}\t{}\t{:?}\t[{b}, {e}]", info.dtype, info.shape);
        if hash {
            line.push('\t');
            line.push_str(&digest(name, info)?);
        }
        println!("{line}");
    }
    Ok(())
}

/// A progress bar on stderr that appears only on a terminal and only after a second.
fn progress_bar() -> (ProgressBar, Instant) {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    (bar, Instant::now())
}

fn load(
    file: Option<PathBuf>,
    device: &str,
    verify: bool,
    dtype: Option<Dtype>,
    pread: bool,
) -> Result<()> {
    let device: Device = device.parse()?;
    // Fail on an unusable device before writing a demo checkpoint.
    let backend = tensorplace::device::open(device)?;
    let _demo_dir;
    let path = match file {
        Some(p) => p,
        None => {
            let dir = tempfile::tempdir()
                .map_err(|e| Error::io("creating a temporary folder", None, e))?;
            let path = dir.path().join("demo.safetensors");
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
            _demo_dir = dir;
            path
        }
    };
    let (bar, started) = progress_bar();
    let terminal = std::io::stderr().is_terminal();
    let mut loader = Loader::new(device).progress(|p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        if terminal && bar.is_hidden() && started.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    });
    if let Some(d) = dtype {
        loader = loader.dtype(d);
    }
    if pread {
        loader = loader.read_mode(ReadMode::Pread);
    }
    let mode = if pread {
        ReadMode::Pread
    } else {
        ReadMode::Mmap
    };
    let t = Instant::now();
    let host = HostFile::open(&path, mode)?;
    let tensors = loader.load_host(&host, backend.device())?;
    let secs = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let bytes = host.header().data_len();
    println!(
        "loaded {} tensors, {} bytes onto {} in {:.3} s: {:.2} GB/s",
        tensors.len(),
        bytes,
        backend.describe(),
        secs,
        bytes as f64 / secs / 1e9
    );
    if verify {
        let reference = HostFile::open(&path, mode)?;
        let mut checked = 0usize;
        for ((name, info), (_, tensor)) in reference.tensors().zip(tensors.iter()) {
            let mut want = vec![0u8; info.len()];
            reference.read_at(reference.header().file_range(info).start, &mut want)?;
            if let Some(c) = tensorplace::Conversion::between(info.dtype, tensor.dtype()) {
                let mut out = vec![0u8; c.output_len(want.len()).unwrap_or(0)];
                c.convert(&want, &mut out);
                want = out;
            }
            let got = tensor.host_bytes().map_err(|e| e.with_tensor(name))?;
            if *got != want[..] {
                return Err(Error::new(
                    ErrorKind::Backend,
                    "the bytes read back differ from the file's",
                )
                .with_tensor(name)
                .with_file(&path));
            }
            checked += got.len();
        }
        println!("verified: every tensor read back equals the file ({checked} bytes)");
    }
    Ok(())
}

fn convert(input: &Path, output: &Path, dtype: Option<Dtype>, device: &str) -> Result<()> {
    let mut loader = Loader::new(device);
    if let Some(d) = dtype {
        loader = loader.dtype(d);
    }
    let tensors = loader.load_file(input)?;
    tensorplace::save_file(&tensors, output, tensors.metadata())?;
    Ok(())
}
