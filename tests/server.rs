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

fn p(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
fn http(url: &str, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    use std::io::{Read, Write};
    let host = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1);
    // A chunked body (the metrics) comes back with its chunk sizes, which the checks ignore.
    (status, body.to_string())
}

fn chat(url: &str, messages: serde_json::Value) -> serde_json::Value {
    let req =
        serde_json::json!({"model": "m", "messages": messages, "max_tokens": 8, "temperature": 0});
    let (status, body) = http(url, "POST", "/v1/chat/completions", Some(&req));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn metric(url: &str, name: &str) -> f64 {
    let (_, text) = http(url, "GET", "/metrics", None);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Waits (up to 5 s) for a counter to reach 1: state files are written after the response, on
/// a thread of their own.
fn wait_for(url: &str, name: &str) {
    for _ in 0..200 {
        if metric(url, name) >= 1.0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// A server restarted on the same `--state-dir` answers a resent conversation from the state
/// its predecessor left on disk, with the output a fresh prefill gives; damaged files there
/// are skipped, and a state directory that disappears, or is read-only, only stops the writes.
#[test]
fn state_dir_keeps_conversations_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (model, states) = (dir.path().join("m"), dir.path().join("states"));
    hadal::demo::write_random_checkpoint(&model, &hadal::demo::demo_config(), 3).unwrap();
    let s = p(&states).to_string();
    let first = [serde_json::json!({"role": "user", "content": "Hello there"})];
    let before = {
        let a = Server::start(&model, &["--state-dir", &s]);
        let r = chat(&a.url, serde_json::json!(first));
        wait_for(&a.url, "hadal_state_disk_writes_total");
        assert_eq!(metric(&a.url, "hadal_state_disk_writes_total"), 1.0);
        r
    };
    std::fs::write(states.join("junk.hst"), b"HADALST\nnot really").unwrap();
    let again = serde_json::json!([
        first[0],
        {"role": "assistant", "content": before["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And then?"},
    ]);
    let fresh = Server::start(&model, &[]);
    let want = chat(&fresh.url, again.clone());
    let b = Server::start(&model, &["--state-dir", &s]);
    assert_eq!(metric(&b.url, "hadal_state_disk_read_errors_total"), 1.0);
    let got = chat(&b.url, again.clone());
    assert_eq!(got["choices"], want["choices"]);
    let cached = &got["usage"]["prompt_tokens_details"]["cached_tokens"];
    let prompt1 = before["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached.as_u64().unwrap() >= prompt1, "{got}");
    assert_eq!(metric(&b.url, "hadal_state_disk_hits_total"), 1.0);

    // The directory goes away: requests still succeed; the writes fail and are counted.
    wait_for(&b.url, "hadal_state_disk_writes_total");
    std::fs::remove_dir_all(&states).unwrap();
    let r = chat(
        &b.url,
        serde_json::json!([{"role": "user", "content": "Something else"}]),
    );
    assert!(r["choices"][0]["message"].is_object());
    wait_for(&b.url, "hadal_state_disk_write_errors_total");
    assert_eq!(metric(&b.url, "hadal_state_disk_write_errors_total"), 1.0);

    // A directory no file can be created in (even by root): the server starts, and requests
    // succeed while the writes fail.
    if cfg!(target_os = "linux") {
        let c = Server::start(&model, &["--state-dir", "/proc/self"]);
        let r = chat(&c.url, serde_json::json!(first));
        assert!(r["choices"][0]["message"].is_object());
        wait_for(&c.url, "hadal_state_disk_write_errors_total");
        assert_eq!(metric(&c.url, "hadal_state_disk_write_errors_total"), 1.0);
    }
}
