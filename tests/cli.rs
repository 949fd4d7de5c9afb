//! The `hadal` binary: outputs on good input; one-line errors, non-zero exits and no partial
//! files on bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use hadal::backend::cpu::{CpuBackend, Numerics};

fn hadal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hadal"))
        .args(args)
        .output()
        .unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Asserts a failure with a single `hadal: error:` line mentioning `needle`.
fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.starts_with("hadal: error: ") && err.contains(needle),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn tokens_file(dir: &Path, ids: &[Vec<i32>]) -> std::path::PathBuf {
    let mut t = std::collections::BTreeMap::new();
    let bytes: Vec<u8> = ids.iter().flatten().flat_map(|i| i.to_le_bytes()).collect();
    t.insert(
        "tokens".to_string(),
        (
            safetensors::Dtype::I32,
            vec![ids.len(), ids[0].len()],
            bytes,
        ),
    );
    let path = dir.join("tokens.safetensors");
    common::write(&path, &t);
    path
}

#[test]
fn inspect_reports_pro_without_weights() {
    let cfg =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek-v4-pro.config.json");
    let out = hadal(&["inspect", "--config", p(&cfg), "--context", "128K"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("1.60T") && s.contains("30 CSA, 31 HCA"), "{s}");
    assert!(s.contains("one sequence at 128K tokens"), "{s}");
    let json = hadal(&["inspect", "--config", p(&cfg), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["context"], 1 << 20);
    assert_eq!(v["config"]["hidden_size"], 7168);
}

#[test]
fn inspect_checks_a_checkpoint() {
    let out = hadal(&["inspect", "--model", p(&common::fixture())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("every tensor matches config.json"));
    let bad = common::damaged(|t| {
        t.remove("mtp.0.hnorm.weight");
    });
    assert_fails(
        &hadal(&["inspect", "--model", p(bad.path())]),
        "mtp.0.hnorm.weight",
    );
    assert_fails(
        &hadal(&["inspect", "--model", "/nonexistent"]),
        "/nonexistent/config.json",
    );
    let cfg = common::fixture().join("config.json");
    assert_fails(
        &hadal(&["inspect", "--config", p(&cfg), "--context", "4096M"]),
        "max_position_embeddings",
    );
}

#[test]
fn score_writes_what_the_library_computes() {
    let dir = tempfile::tempdir().unwrap();
    let ids = vec![
        (0..24).map(|i| i * 37 % 1000).collect::<Vec<i32>>(),
        (0..24).map(|i| i * 11 % 997).collect(),
    ];
    let tokens = tokens_file(dir.path(), &ids);
    let out_path = dir.path().join("out.safetensors");
    let out = hadal(&[
        "score",
        "--model",
        p(&common::fixture()),
        "--tokens",
        p(&tokens),
        "--out",
        p(&out_path),
        "--prefill",
        "9",
        "--mtp",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = common::read(&out_path);
    let (_, shape, logits) = &written["logits"];
    assert_eq!(shape, &vec![2, 24, 1024]);
    assert_eq!(written["mtp_logits"].1, vec![2, 8, 1024]);

    // `score` takes the reference's summation orders unless told otherwise.
    let backend = CpuBackend::with_numerics(&common::fixture(), Numerics::ReferenceShapes).unwrap();
    let seqs: Vec<Vec<u32>> = ids
        .iter()
        .map(|s| s.iter().map(|&i| i as u32).collect())
        .collect();
    let want = hadal::score::score(&backend, &seqs, &[9], true).unwrap();
    let got: Vec<f32> = logits
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, want.logits);
    let mtp: Vec<f32> = written["mtp_logits"]
        .2
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(Some(mtp), want.mtp_logits);
}

#[test]
fn score_refuses_bad_input_without_leaving_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture();
    let out_path = dir.path().join("out.safetensors");
    let good = tokens_file(dir.path(), &[vec![1, 2, 3, 4]]);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--prefill".into(), "9".into()], "--prefill 9"),
        (vec!["--prefill".into(), "0".into()], "--prefill 0"),
        (
            vec!["--prefill".into(), "1".into(), "--mtp".into()],
            "--mtp",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "score",
            "--model",
            p(&model),
            "--tokens",
            p(&good),
            "--out",
            p(&out_path),
        ];
        args.extend(extra.iter().map(String::as_str));
        assert_fails(&hadal(&args), needle);
        assert!(!out_path.exists());
    }
    let oov = tokens_file(dir.path(), &[vec![1, 5000]]);
    assert_fails(
        &hadal(&[
            "score",
            "--model",
            p(&model),
            "--tokens",
            p(&oov),
            "--out",
            p(&out_path),
        ]),
        "5000",
    );
    let neg = tokens_file(dir.path(), &[vec![1, -3]]);
    assert_fails(
        &hadal(&[
            "score",
            "--model",
            p(&model),
            "--tokens",
            p(&neg),
            "--out",
            p(&out_path),
        ]),
        "-3",
    );
    let cfg = model.join("config.json");
    assert_fails(
        &hadal(&[
            "score",
            "--model",
            p(&model),
            "--tokens",
            p(&cfg),
            "--out",
            p(&out_path),
        ]),
        "not a safetensors file",
    );
    assert_fails(
        &hadal(&[
            "score",
            "--model",
            p(&model),
            "--tokens",
            p(&good),
            "--out",
            "/nonexistent/dir/x",
        ]),
        "does not exist",
    );
    assert!(!out_path.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn usage_errors_exit_nonzero() {
    let out = hadal(&["score", "--model", "x"]);
    assert!(!out.status.success());
    let out = hadal(&["inspect"]);
    assert!(!out.status.success());
}

#[test]
fn render_prints_the_official_prompts_and_ids() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoding");
    for n in 1..=4 {
        let input = dir.join(format!("test_input_{n}.json"));
        let mode = if n == 4 { "chat" } else { "thinking" };
        let out = hadal(&["render", "--thinking-mode", mode, p(&input)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.stdout,
            std::fs::read(dir.join(format!("test_output_{n}.txt"))).unwrap(),
            "case {n}"
        );
        let ids = hadal(&["render", "--ids", "--thinking-mode", mode, p(&input)]);
        let got: Vec<u32> = serde_json::from_slice(&ids.stdout).unwrap();
        let want: Vec<u32> = serde_json::from_slice(
            &std::fs::read(dir.join(format!("test_output_{n}.ids.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(got, want, "case {n} ids");
    }
    let bad = hadal(&["render", p(&dir.join("test_output_1.txt"))]);
    assert_fails(&bad, "not JSON");
}

#[test]
fn parse_reads_a_completion_from_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hadal"))
        .args(["parse", "--thinking-mode", "thinking"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Sum.</think>4<｜end▁of▁sentence｜>".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reasoning_content"], "Sum.");
    assert_eq!(v["content"], "4");
    assert!(v.get("error").is_none());
}

#[test]
fn demo_runs_out_of_the_box() {
    let out = hadal(&["demo", "--max-tokens", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("RANDOM weights"), "{s}");
    assert!(s.contains("tokens/s"), "{s}");
    for line in [
        "V4-Flash 128K",
        "V4-Flash   1M",
        "V4-Pro   128K",
        "V4-Pro     1M",
    ] {
        assert!(s.contains(line), "{line} missing from {s}");
    }
}

fn chat(model: &Path, sessions: &Path, extra: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hadal"))
        .args([
            "chat",
            "--model",
            p(model),
            "--sessions",
            p(sessions),
            "--device",
            "cpu",
        ])
        .args(["--max-tokens", "4"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `/save` in one chat process, `--resume` in the next: the conversation goes on without a
/// new prefill of its history; `state inspect` describes the file, and refuses a damaged one
/// or another model's.
#[test]
fn chat_saves_and_resumes_and_state_inspect_checks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (model, other, sessions) = (
        dir.path().join("m"),
        dir.path().join("o"),
        dir.path().join("chats"),
    );
    hadal::demo::write_random_checkpoint(&model, &hadal::demo::demo_config(), 3).unwrap();
    hadal::demo::write_random_checkpoint(&other, &hadal::demo::demo_config(), 4).unwrap();
    let out = chat(
        &model,
        &sessions,
        &[],
        "Hello there\n/save first\n/save ../x\n/quit\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(saved as first:"), "{err}");
    assert!(err.contains("a conversation's name is letters"), "{err}");
    let file = sessions.join("first.hst");

    let out = chat(&model, &sessions, &["--resume", "first"], "And then?\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(resumed first: 2 messages"), "{err}");
    let prefilled: usize = err
        .split('[')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no turn report: {err}"));
    assert!(
        prefilled < 20 && !err.contains("whole conversation"),
        "{err}"
    );

    let out = hadal(&["state", "inspect", p(&file), "--model", p(&model)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "every checksum matches",
        "(the model in",
        "a chat: 2 messages",
        "blocks      4:",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    assert_fails(
        &hadal(&["state", "inspect", p(&file), "--model", p(&other)]),
        "a state of another model",
    );
    // (After the model's load line.)
    let out = chat(&other, &sessions, &["--resume", "first"], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("hadal: error: ") && last.contains("not of the loaded model"),
        "{err}"
    );
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let bad = dir.path().join("bad.hst");
    std::fs::write(&bad, &bytes).unwrap();
    assert_fails(&hadal(&["state", "inspect", p(&bad)]), "corrupt");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&hadal(&["state", "inspect", p(&bad)]), "truncated");
}
