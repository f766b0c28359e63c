//! The binary as built by cargo: its version, help and device list. (The library's
//! integration tests, `tests/cli.rs` at the workspace root, exercise every command on real
//! files; their binary is the one this package builds, beside them in the target folder.)

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tensorplace"))
        .args(args)
        .env(
            "XDG_RUNTIME_DIR",
            std::env::var_os("XDG_RUNTIME_DIR").unwrap_or("/tmp".into()),
        )
        .output()
        .expect("the tensorplace binary runs")
}

#[test]
fn version_help_and_devices() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        version.trim(),
        format!("tensorplace {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["inspect", "load", "convert", "devices", "bench"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
    let out = run(&["devices"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("cpu: "))
    );
    // A command that is not there: clap's usage error, status 2.
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
}
