//! The official chat-encoding cases: prompts byte for byte.

use std::path::PathBuf;

use hadal::chat::request::conversation;
use hadal::chat::{encode, Options, ThinkingMode};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoding")
}

fn case(n: usize) -> (String, String) {
    let input = std::fs::read_to_string(dir().join(format!("test_input_{n}.json"))).unwrap();
    let want = std::fs::read_to_string(dir().join(format!("test_output_{n}.txt"))).unwrap();
    let req: serde_json::Value = serde_json::from_str(&input).unwrap();
    let (messages, _, _) = conversation(&req).unwrap();
    let mode = if n == 4 {
        ThinkingMode::Chat
    } else {
        ThinkingMode::Thinking
    };
    (
        encode(
            &messages,
            &Options {
                mode,
                ..Options::default()
            },
        )
        .unwrap(),
        want,
    )
}

#[test]
fn official_cases_render_byte_for_byte() {
    for n in 1..=4 {
        let (got, want) = case(n);
        if got != want {
            let at = got
                .bytes()
                .zip(want.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            panic!(
                "case {n} differs at byte {at}:\n got: {:?}\nwant: {:?}",
                &got[at.saturating_sub(40)..(at + 80).min(got.len())],
                &want[at.saturating_sub(40)..(at + 80).min(want.len())]
            );
        }
    }
}

#[test]
fn official_cases_tokenize_to_the_official_ids() {
    let tok = hadal::tokenizer::Tokenizer::bundled();
    for n in 1..=4 {
        let (prompt, _) = case(n);
        let want: Vec<u32> = serde_json::from_str(
            &std::fs::read_to_string(dir().join(format!("test_output_{n}.ids.json"))).unwrap(),
        )
        .unwrap();
        let got = tok.encode(&prompt).unwrap();
        assert_eq!(got, want, "case {n}");
        assert_eq!(tok.decode(&got).unwrap(), prompt, "case {n} decodes back");
    }
}
