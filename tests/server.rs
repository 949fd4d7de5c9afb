//! The real server on loopback, driven by the official `openai` Python client
//! (`tests/openai_client.py`; `pip install -r tests/requirements.txt`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A `hadal serve` process on an ephemeral port, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hadal"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(u) = line.strip_prefix("hadal: serving on ") {
                break u.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn openai_client_drives_the_server() {
    let dir = tempfile::tempdir().unwrap();
    hadal::demo::write_random_checkpoint(dir.path(), &hadal::demo::demo_config(), 3).unwrap();
    let main = Server::start(dir.path(), &["--api-key", "test-key", "--max-running", "8"]);
    let tiny = Server::start(
        dir.path(),
        &[
            "--max-running",
            "1",
            "--max-queue",
            "1",
            "--prefix-cache",
            "0",
        ],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new("python3")
        .args([script, &main.url, &tiny.url, "test-key"])
        .output()
        .expect("python3 is needed for the server tests");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{log}");
    assert!(out.status.success(), "server checks failed:\n{log}");
    assert!(log.contains("all server checks passed"));
}
