//! State files: exact round trips, refusal of anything damaged or foreign, and atomic writes
//! that survive a writer killed at any point.

use std::path::Path;
use std::process::Command;

use hadal::backend::cpu::{Cpu, CpuBackend};
use hadal::backend::{Backend, Runner, Seq, SeqInput};
use hadal::checkpoint::Fingerprint;
use hadal::error::Error;
use hadal::model::Model;
use hadal::state::file::{self, Saved};
use hadal::state::SeqState;

fn demo() -> CpuBackend {
    let cfg = hadal::demo::demo_config();
    let ck = hadal::demo::random_checkpoint(&cfg, 5);
    Runner::new(
        Cpu::default(),
        Model::from_checkpoint(&Cpu::default(), cfg, ck, &|_, _| {}).unwrap(),
    )
}

fn feed(b: &CpuBackend, seq: &mut Seq, tokens: &[u32]) {
    b.forward(&mut [SeqInput { state: seq, tokens }]).unwrap();
}

fn host(seq: &Seq) -> &SeqState {
    match seq {
        Seq::Host(s) => s,
        _ => unreachable!("a CPU state"),
    }
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 7919 % 5000) as u32 + 10).collect()
}

/// States of every layer kind (window, CSA, HCA) mid-block, with a partly filled window and
/// after it wrapped, come back bit for bit; so does the state at a saved prompt point.
#[test]
fn states_round_trip_exactly_with_their_prompt_point() {
    let b = demo();
    let fp = b.fingerprint();
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(310);
    // 37: every compressor mid-block, the window partly filled; 203: the window wrapped,
    // an HCA entry emitted, CSA mid-block.
    for (prompt_len, total) in [(0usize, 37usize), (37, 203), (150, 300)] {
        let mut seq = b.new_state().unwrap();
        feed(&b, &mut seq, &toks[..prompt_len.max(1)]);
        let at_prompt = host(&seq).clone();
        let mark = host(&seq).mark();
        feed(&b, &mut seq, &toks[prompt_len.max(1)..total]);
        let path = dir.path().join(format!("s{total}.hst"));
        let extra = serde_json::json!({"note": "test", "n": total});
        let bytes = file::write(
            &path,
            &Saved {
                model: fp,
                tokens: &toks[..total],
                state: host(&seq),
                prompt: Some(&mark),
                extra: extra.clone(),
            },
        )
        .unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let back = file::read(&path, Some(&fp)).unwrap();
        assert_eq!(&back.state, host(&seq), "state at {total}");
        assert_eq!(back.tokens, &toks[..total]);
        assert_eq!(back.header.extra, extra);
        back.state.check(b.config()).unwrap();
        // The prompt point: rewinding the loaded state gives the state the prompt left.
        let mut rewound = back.state.clone();
        rewound.rewind(back.prompt.expect("a prompt point"));
        assert_eq!(rewound, at_prompt, "state at the prompt point {prompt_len}");
        rewound.check(b.config()).unwrap();
        // And the loaded state decodes as the original does.
        let mut a = b.import_state(host(&seq)).unwrap();
        let mut c = b.import_state(&back.state).unwrap();
        let ha = b
            .download(
                &b.forward(&mut [SeqInput {
                    state: &mut a,
                    tokens: &toks[total..total + 3],
                }])
                .unwrap(),
            )
            .unwrap();
        let hc = b
            .download(
                &b.forward(&mut [SeqInput {
                    state: &mut c,
                    tokens: &toks[total..total + 3],
                }])
                .unwrap(),
            )
            .unwrap();
        assert_eq!(ha, hc);
        assert_eq!(file::verify(&path).unwrap(), back.header);
    }
}

fn synthetic_state(pos: usize, seed: u32) -> SeqState {
    let mut s = SeqState::new(&[0, 4, 128, 4]);
    s.pos = pos;
    s.prompt_end = pos;
    let mut x = seed;
    let mut next = || {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        x
    };
    for b in &mut s.blocks {
        b.window = (0..4096).map(|_| next() as u8).collect();
        for c in [&mut b.compressor, &mut b.indexer].into_iter().flatten() {
            c.kv = (0..(pos % 4) * 64).map(|_| next() as f32).collect();
            c.score = c.kv.clone();
            c.entries.len = pos / 4;
            c.entries.data = (0..c.entries.len * 4000).map(|_| next() as u8).collect();
        }
    }
    s
}

fn save(path: &Path, s: &SeqState, fp: Fingerprint) -> u64 {
    file::write(
        path,
        &Saved {
            model: fp,
            tokens: &tokens(s.pos),
            state: s,
            prompt: None,
            extra: serde_json::Value::Null,
        },
    )
    .unwrap()
}

fn refused(path: &Path, fp: &Fingerprint) -> String {
    match file::read(path, Some(fp)) {
        Err(e @ Error::State { .. }) => e.to_string(),
        Err(e) => panic!("{}: refused, but not as a bad state: {e}", path.display()),
        Ok(_) => panic!("{}: accepted", path.display()),
    }
}

/// A file cut anywhere, with any bit flipped, with bytes added, of another model, of another
/// format version, or not a state file at all, is refused with a reason, never accepted or
/// panicking.
#[test]
fn damaged_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fp = Fingerprint([3; 32]);
    let s = synthetic_state(1003, 1);
    let good = dir.path().join("good.hst");
    let n = save(&good, &s, fp) as usize;
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.hst");
    let mut r = 12345u64;
    let mut rand = |m: usize| {
        r = r
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (r >> 33) as usize % m
    };
    for cut in (0..n).step_by(n / 97).chain([1, 8, 15, 16, 100, n - 1]) {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let why = refused(&bad, &fp);
        assert!(
            cut < 20 || why.contains("truncated") || why.contains("header"),
            "cut at {cut}: {why}"
        );
    }
    for _ in 0..200 {
        let mut b = bytes.clone();
        b[rand(n)] ^= 1 << rand(8);
        std::fs::write(&bad, &b).unwrap();
        refused(&bad, &fp);
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"more");
    std::fs::write(&bad, &longer).unwrap();
    assert!(refused(&bad, &fp).contains("trailing"));
    assert!(refused(&good, &Fingerprint([4; 32])).contains("not of the loaded model"));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    std::fs::write(&bad, &v2).unwrap();
    assert!(refused(&bad, &fp).contains("version 2"));
    std::fs::write(&bad, b"{\"not\": \"a state\"}").unwrap();
    assert!(refused(&bad, &fp).contains("not a hadal state file"));
    // Untouched, it reads; a state that does not fit the model is refused on import.
    assert_eq!(file::read(&good, Some(&fp)).unwrap().state, s);
    let b = demo();
    let err = match b.import_state(&s) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a state of other shapes was imported"),
    };
    assert!(err.contains("window"), "{err}");
}

const CHILD_DIR: &str = "HADAL_STATE_WRITER_DIR";

/// Not a test on its own: run by `writes_survive_a_killed_writer` in a child process, it writes
/// states into a directory until killed.
#[test]
fn state_writer_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let fp = Fingerprint([9; 32]);
    for i in 0.. {
        let s = synthetic_state(2000 + i % 7, i as u32);
        save(&Path::new(&dir).join(format!("s{}.hst", i % 5)), &s, fp);
    }
}

/// A writer killed (SIGKILL) at random points, 50 times, leaves only complete files under their
/// names (each reads back and checks out); interrupted writes remain only as temporary files.
#[test]
fn writes_survive_a_killed_writer() {
    let dir = tempfile::tempdir().unwrap();
    let fp = Fingerprint([9; 32]);
    let exe = std::env::current_exe().unwrap();
    let (mut seen, mut cut) = (0, 0);
    for round in 0..50u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "state_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The kill lands a while after the writer has begun this round's first file (not
        // after the spawn: on a loaded machine the process alone can take longer to start than
        // the delays, and the rounds would then kill it before it wrote anything).
        let (spawned, start) = (std::time::SystemTime::now(), std::time::Instant::now());
        let writing = || {
            // Entries may be renamed away while this looks at them.
            std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
                file::is_temporary(&e.file_name().to_string_lossy())
                    || e.metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t >= spawned)
            })
        };
        while !writing() && start.elapsed() < std::time::Duration::from_secs(20) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(5 + round * 37 % 60));
        child.kill().unwrap();
        child.wait().unwrap();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if file::is_temporary(&name) {
                std::fs::remove_file(e.path()).unwrap();
                cut += 1;
                continue;
            }
            let back = file::read(&e.path(), Some(&fp))
                .unwrap_or_else(|err| panic!("round {round}: {name} is not whole: {err}"));
            assert!((2000..2007).contains(&back.state.pos));
            seen += 1;
        }
    }
    eprintln!("{seen} whole files checked, {cut} interrupted writes left as temporary files");
    assert!(seen > 0, "the writer never finished a file");
}
