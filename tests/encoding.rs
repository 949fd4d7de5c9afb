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
    let messages = conversation(&req).unwrap().messages;
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

mod round_trip {
    use hadal::chat::parse::{parse, parse_strict, Parsed, ToolCall};
    use hadal::chat::{encode, Message, Options, ThinkingMode};
    use proptest::prelude::*;

    /// The completion text of an assistant message: its encoding after a user turn, minus the
    /// prompt that precedes it.
    fn completion(p: &Parsed, mode: ThinkingMode) -> String {
        let user: Message = serde_json::from_str(r#"{"role": "user", "content": "q"}"#).unwrap();
        let o = Options {
            mode,
            ..Options::default()
        };
        let prompt = encode(std::slice::from_ref(&user), &o).unwrap();
        let full = encode(&[user, p.to_message()], &o).unwrap();
        full.strip_prefix(&prompt)
            .expect("the prompt is a prefix")
            .to_string()
    }

    #[test]
    fn official_assistant_turns_round_trip() {
        for (n, marker, mode) in [
            (1, "<｜Assistant｜><think>", ThinkingMode::Thinking),
            (2, "<｜Assistant｜><think>", ThinkingMode::Thinking),
        ] {
            let text =
                std::fs::read_to_string(super::dir().join(format!("test_output_{n}.txt"))).unwrap();
            let start = text.rfind(marker).unwrap() + marker.len();
            let turn = &text[start..];
            let p = parse_strict(turn, mode).unwrap();
            assert_eq!(completion(&p, mode), turn, "case {n}");
        }
    }

    fn plain() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 .,:;!?'\"{}\\[\\]\n中文é<>/=_-]{0,24}".prop_filter("no markup", |s| {
            !s.contains("</think>")
                && !s.contains("<think>")
                && !s.starts_with('\n')
                && !s.ends_with('\n')
        })
    }

    fn value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            plain().prop_map(serde_json::Value::from),
            (-1000i64..1000).prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(serde_json::Value::from),
            proptest::bool::ANY.prop_map(serde_json::Value::from),
            proptest::collection::vec((-9i64..9).prop_map(serde_json::Value::from), 0..4)
                .prop_map(serde_json::Value::from),
        ]
    }

    fn call() -> impl Strategy<Value = ToolCall> {
        (
            "[a-z_]{1,8}",
            proptest::collection::vec(("[a-z]{1,6}", value()), 0..4),
        )
            .prop_map(|(name, args)| {
                let mut m = serde_json::Map::new();
                for (k, v) in args {
                    m.insert(k, v);
                }
                ToolCall {
                    name,
                    arguments: hadal::chat::json::dumps(&serde_json::Value::Object(m)),
                }
            })
    }

    proptest! {
        #[test]
        fn any_parsed_message_re_encodes_to_its_text(
            reasoning in plain(),
            content in plain(),
            calls in proptest::collection::vec(call(), 0..3),
            think in proptest::bool::ANY,
        ) {
            let mode = if think { ThinkingMode::Thinking } else { ThinkingMode::Chat };
            let msg = Parsed {
                reasoning_content: if think { reasoning } else { String::new() },
                content,
                tool_calls: calls,
                error: None,
            };
            let text = completion(&msg, mode);
            let back = parse(&text, mode);
            prop_assert_eq!(&back, &msg, "text {:?}", text);
            prop_assert_eq!(completion(&back, mode), text);
        }
    }
}

/// Conversations beyond the four official cases (tool calls in both modes, results out of
/// order, unparseable arguments, response formats, developer and latest_reminder turns, every
/// task, effort levels, kept reasoning, consecutive users, wo_eos), with the prompts the
/// official encoder produced for them.
#[test]
fn differential_cases_match_the_official_encoder() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("differential.json")).unwrap())
            .unwrap();
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let messages = conversation(&c["messages"]).unwrap().messages;
        let o = Options {
            mode: if c["mode"] == "chat" {
                ThinkingMode::Chat
            } else {
                ThinkingMode::Thinking
            },
            effort: c["effort"]
                .as_str()
                .map(|e| hadal::chat::request::parse_effort(e).unwrap()),
            drop_thinking: c["drop_thinking"].as_bool().unwrap(),
            add_bos: true,
        };
        let got = encode(&messages, &o).unwrap();
        if got != c["prompt"].as_str().unwrap() {
            failed.push((i, got, c["prompt"].as_str().unwrap().to_string()));
        }
    }
    for (i, got, want) in &failed {
        let at = got
            .bytes()
            .zip(want.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        eprintln!(
            "case {i} differs at byte {at}:\n got: {:?}\nwant: {:?}",
            &got[at.saturating_sub(30)..],
            &want[at.saturating_sub(30)..]
        );
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases differ",
        failed.len(),
        cases.len()
    );
}
