//! A chat session keeps its decode state: the second turn feeds only what it adds, and continues
//! exactly as a fresh run over the same tokens.

use hadal::backend::cpu::CpuBackend;
use hadal::backend::Backend;
use hadal::chat::{encode, Message, Options, ThinkingMode};
use hadal::generate::{generate, Prefill, SamplingParams};
use hadal::session::{ChatSession, TurnOptions};
use hadal::tokenizer::Tokenizer;

#[test]
fn second_turn_reuses_the_state() {
    let dir = tempfile::tempdir().unwrap();
    hadal::demo::write_random_checkpoint(dir.path(), &hadal::demo::demo_config(), 5).unwrap();
    let backend = CpuBackend::open(dir.path()).unwrap();
    let tok = Tokenizer::for_model(dir.path()).unwrap();
    let params = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let mut s = ChatSession::new(&backend, ThinkingMode::Thinking).unwrap();

    let t1 = s
        .turn(
            &backend,
            &tok,
            "Hello there",
            TurnOptions {
                params: &params,
                speculative: false,
                prefill: Prefill::default(),
            },
            |_| true,
        )
        .unwrap();
    assert!(t1.restarted);
    let transcript1 = s.transcript().to_string();
    let t2 = s
        .turn(
            &backend,
            &tok,
            "And then?",
            TurnOptions {
                params: &params,
                speculative: false,
                prefill: Prefill::default(),
            },
            |_| true,
        )
        .unwrap();
    assert!(
        !t2.restarted,
        "the second turn must not prefill the conversation again"
    );

    // The same tokens fed to a fresh state give the same continuation.
    let user = |c: &str| -> Message {
        serde_json::from_value(serde_json::json!({"role": "user", "content": c})).unwrap()
    };
    let o = Options {
        mode: ThinkingMode::Thinking,
        drop_thinking: false,
        ..Options::default()
    };
    let prompt1 = encode(&[user("Hello there")], &o).unwrap();
    let mut msgs = vec![
        user("Hello there"),
        t1.parsed.to_message(),
        user("And then?"),
    ];
    let prompt2 = encode(&msgs, &o).unwrap();
    let suffix = prompt2
        .strip_prefix(transcript1.as_str())
        .expect("prefix-stable rendering");
    let mut tokens = tok.encode(&prompt1).unwrap();
    tokens.extend(&t1.completion.tokens);
    tokens.extend(tok.encode(suffix).unwrap());
    let mut fresh = backend.new_state().unwrap();
    let c = generate(
        &backend,
        &tok,
        &mut fresh,
        &tokens,
        &params,
        Prefill {
            chunk: 512,
            progress: None,
        },
        |_| true,
    )
    .unwrap();
    assert_eq!(c.tokens, t2.completion.tokens);
    assert!(
        t2.prefilled < tokens.len() / 2,
        "{} of {}",
        t2.prefilled,
        tokens.len()
    );
    msgs.push(t2.parsed.to_message());
    assert_eq!(s.messages, msgs);

    // Switching mode changes the rendering of the history: the next turn starts over.
    s.mode = ThinkingMode::Chat;
    let t3 = s
        .turn(
            &backend,
            &tok,
            "Bye",
            TurnOptions {
                params: &params,
                speculative: false,
                prefill: Prefill::default(),
            },
            |_| true,
        )
        .unwrap();
    assert!(t3.restarted);
}

/// A conversation saved after a turn and loaded by another process's model continues exactly
/// as the original does, without prefilling the conversation again; a saved chat of another
/// model is refused.
#[test]
fn a_saved_conversation_continues_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    hadal::demo::write_random_checkpoint(dir.path(), &hadal::demo::demo_config(), 5).unwrap();
    let backend = CpuBackend::open(dir.path()).unwrap();
    let tok = Tokenizer::for_model(dir.path()).unwrap();
    let params = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let opts = TurnOptions {
        params: &params,
        speculative: false,
        prefill: Prefill::default(),
    };
    let mut s = ChatSession::new(&backend, ThinkingMode::Thinking).unwrap();
    s.turn(&backend, &tok, "Hello there", opts, |_| true)
        .unwrap();
    let path = dir.path().join("chat.hst");
    s.save(&backend, &path).unwrap();

    let reopened = CpuBackend::open(dir.path()).unwrap();
    let mut r = ChatSession::load(&reopened, &path).unwrap();
    assert_eq!(r.messages, s.messages);
    assert_eq!(r.transcript(), s.transcript());
    assert_eq!(r.context_tokens(), s.context_tokens());
    let a = s.turn(&backend, &tok, "And then?", opts, |_| true).unwrap();
    let b = r
        .turn(&reopened, &tok, "And then?", opts, |_| true)
        .unwrap();
    assert!(
        !b.restarted,
        "the loaded conversation prefilled itself again"
    );
    assert_eq!(b.prefilled, a.prefilled);
    assert_eq!(b.completion.tokens, a.completion.tokens);
    assert_eq!(r.messages, s.messages);

    let other = tempfile::tempdir().unwrap();
    hadal::demo::write_random_checkpoint(other.path(), &hadal::demo::demo_config(), 6).unwrap();
    let foreign = CpuBackend::open(other.path()).unwrap();
    let err = match ChatSession::load(&foreign, &path) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a chat of another model was loaded"),
    };
    assert!(err.contains("not of the loaded model"), "{err}");
}
