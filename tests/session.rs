//! The conversation engine shared by `chat` and `serve`: cancellation (Ctrl-C, client gone),
//! stop strings, and prefix reuse through state snapshots when a prompt diverges.

use flashmoe::generate::SamplingParams;
use flashmoe::load::load_model;
use flashmoe::session::{Finish, Session};
use flashmoe::tokenizer::TextTokenizer;
use std::path::Path;

fn session() -> Session {
    let dir = Path::new(flashmoe::builtin::SOURCE);
    Session::new(load_model(dir).unwrap(), TextTokenizer::load(dir).unwrap())
}

fn greedy() -> SamplingParams {
    // end-of-text banned so only the caller decides when to stop
    SamplingParams { logit_bias: vec![(4089, -100.0), (4091, -100.0)], ..Default::default() }
}

#[test]
fn cancel_stops_generation_at_once() {
    let mut s = session();
    let prompt = s.tok.encode("ROMEO:").unwrap();
    let mut pieces = 0;
    let o = s
        .generate(&prompt, 500, &greedy(), &[], |_| {
            pieces += 1;
            pieces < 3
        })
        .unwrap();
    assert_eq!(o.finish, Finish::Cancelled);
    assert!(o.tokens.len() <= 6, "{} tokens after cancelling", o.tokens.len());
}

#[test]
fn stop_strings_end_the_text_before_them_and_are_never_streamed() {
    let mut s = session();
    let prompt = s.tok.encode("ROMEO:").unwrap();
    let full = s.generate(&prompt, 40, &greedy(), &[], |_| true).unwrap();
    // stop at the third word of the greedy continuation
    let words: Vec<&str> = full.text.split_whitespace().collect();
    let stop = words[2].to_string();
    let mut streamed = String::new();
    let o = s
        .generate(&prompt, 40, &greedy(), std::slice::from_ref(&stop), |t| {
            streamed.push_str(t);
            true
        })
        .unwrap();
    assert_eq!(o.finish, Finish::Stop);
    assert_eq!(o.text, full.text[..full.text.find(&stop).unwrap()]);
    assert_eq!(streamed, o.text);
}

#[test]
fn diverging_prompts_resume_from_snapshots_with_identical_results() {
    let mut s = session();
    let a = s.tok.encode("ROMEO: But soft, what light through yonder window breaks?").unwrap();
    let b = s.tok.encode("ROMEO: But soft, what light is that?").unwrap();
    let a_ext = s.tok.encode("ROMEO: But soft, what light through yonder window breaks? It is the east.").unwrap();
    assert_eq!(a_ext[..a.len()], a[..]);
    let base = |p: &[u32]| session().generate(p, 12, &greedy(), &[], |_| true).unwrap().tokens;
    let (base_a, base_b, base_ext) = (base(&a), base(&b), base(&a_ext));

    let o = s.generate(&a, 12, &greedy(), &[], |_| true).unwrap();
    assert_eq!((o.reused_tokens, &o.tokens), (0, &base_a));
    // the same prompt again: everything but its last token comes from the snapshot
    let o = s.generate(&a, 12, &greedy(), &[], |_| true).unwrap();
    assert_eq!((o.reused_tokens, &o.tokens), (a.len() - 1, &base_a));
    // a prompt that extends `a` differently from what was generated resumes at a's snapshot
    let o = s.generate(&a_ext, 12, &greedy(), &[], |_| true).unwrap();
    assert_eq!((o.reused_tokens, &o.tokens), (a.len() - 1, &base_ext));
    // one that diverges inside `a`: no snapshot lies before the divergence, a clean restart
    let o = s.generate(&b, 12, &greedy(), &[], |_| true).unwrap();
    assert_eq!((o.reused_tokens, &o.tokens), (0, &base_b));
}

/// The callback runs once per generated token even while nothing can be shown (text held back
/// as a possible stop string): a client that left is noticed at the next token, not at the
/// next text.
#[test]
fn cancellation_is_asked_every_token() {
    let mut s = session();
    let prompt = s.tok.encode("ROMEO:").unwrap();
    let mut calls = 0;
    // every text ending in a letter could begin a stop string of letters: most is held back
    let stops: Vec<String> = ('a'..='z').map(|c| format!("{c}\u{1}")).collect();
    let o = s
        .generate(&prompt, 30, &greedy(), &stops, |_| {
            calls += 1;
            true
        })
        .unwrap();
    assert!(calls >= o.tokens.len(), "{calls} calls for {} tokens", o.tokens.len());
    let mut calls = 0;
    let o = s
        .generate(&prompt, 30, &greedy(), &stops, |_| {
            calls += 1;
            calls < 5
        })
        .unwrap();
    assert_eq!(o.finish, Finish::Cancelled);
    assert!(o.tokens.len() <= 5, "{} tokens", o.tokens.len());
}

/// With thinking off the generation prompt ends in an empty `<think></think>` that the next
/// turn's rendering of history drops: the turn must still resume from a snapshot where its
/// predecessor's last turn began, not recompute the whole conversation, and give what a fresh
/// session gives.
#[test]
fn the_next_turn_reuses_the_conversation_with_thinking_off() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_moe");
    let open = || Session::new(load_model(&dir).unwrap(), TextTokenizer::load(&dir).unwrap());
    let mut s = open();
    let mut extra = serde_json::Map::new();
    extra.insert("enable_thinking".into(), serde_json::json!(false));
    let user = |t: &str| serde_json::json!({"role": "user", "content": t});
    let mut msgs = vec![user("Hello there")];
    let p1 = s.chat_prompt(&serde_json::json!(msgs), None, &extra).unwrap();
    let o1 = s.generate(&p1, 6, &SamplingParams::default(), &[], |_| true).unwrap();
    msgs.push(serde_json::json!({"role": "assistant", "content": o1.text}));
    msgs.push(user("And then?"));
    let p2 = s.chat_prompt(&serde_json::json!(msgs), None, &extra).unwrap();
    let first_turn =
        s.tok.encode(&s.tok.apply_chat_template(&serde_json::json!(msgs[..1]), None, false, &extra).unwrap()).unwrap();
    assert!(p2.starts_with(&first_turn));
    let o2 = s.generate(&p2, 6, &SamplingParams::default(), &[], |_| true).unwrap();
    assert_eq!(o2.reused_tokens, first_turn.len(), "turn 2 resumes where turn 1's last turn began");
    let fresh = open().generate(&p2, 6, &SamplingParams::default(), &[], |_| true).unwrap();
    assert_eq!(o2.tokens, fresh.tokens);
}

/// The choices of one request (`n` > 1 in the server) generate the same prompt again: each
/// resumes from the snapshot the first prefill left, so the prompt is prefilled once, and a
/// seed gives the answer a fresh session gives.
#[test]
fn the_same_prompt_again_resumes_from_its_snapshot() {
    let mut s = session();
    let prompt = s.tok.encode("ROMEO: What light through yonder window breaks?").unwrap();
    let sampled = |seed| SamplingParams { temperature: 1.0, seed, ..greedy() };
    let first = s.generate(&prompt, 10, &sampled(1), &[], |_| true).unwrap();
    assert_eq!(first.reused_tokens, 0);
    for seed in [2, 1] {
        let o = s.generate(&prompt, 10, &sampled(seed), &[], |_| true).unwrap();
        assert_eq!(o.reused_tokens, prompt.len() - 1, "only the last prompt token is fed again");
        assert_eq!(o.tokens, session().generate(&prompt, 10, &sampled(seed), &[], |_| true).unwrap().tokens);
    }
}

/// Log-probabilities come with the text their tokens begin, the stop string's own tokens
/// left out; scoring the prompt leaves the state ready to generate after it.
#[test]
fn logprobs_follow_the_text_and_the_prompt_can_be_scored() {
    let mut s = session();
    let prompt = s.tok.encode("ROMEO:").unwrap();
    let p = SamplingParams { logprobs: Some(2), ..greedy() };
    let full = s.generate(&prompt, 20, &p, &[], |_| true).unwrap();
    assert_eq!(full.logprobs.len(), full.tokens.len());
    let ids: Vec<u32> = full.logprobs.iter().map(|l| l.logprob.token).collect();
    assert_eq!(ids, full.tokens);
    assert!(full.logprobs.windows(2).all(|w| w[0].offset <= w[1].offset));
    // a stop string inside the text: the tokens that begin before it, streamed with their text
    let word = full.text.split_whitespace().nth(2).unwrap().to_string();
    let (mut streamed, mut pieces) = (vec![], String::new());
    let o = s
        .generate_with(&prompt, 20, &p, std::slice::from_ref(&word), |piece, lps| {
            pieces.push_str(piece);
            streamed.extend(lps.iter().map(|l| l.offset));
            true
        })
        .unwrap();
    assert_eq!(pieces, o.text);
    assert_eq!(streamed, o.logprobs.iter().map(|l| l.offset).collect::<Vec<_>>());
    assert!(o.logprobs.iter().all(|l| l.offset < o.text.len()) && o.logprobs.len() < full.logprobs.len());
    // scoring: one entry per prompt token after the first, then generation prefills one token
    let scored = s.score_prompt(&prompt, &p).unwrap();
    assert_eq!(scored.iter().map(|l| l.token).collect::<Vec<_>>(), prompt[1..]);
    assert!(scored.iter().all(|l| l.logprob.is_finite() && l.logprob <= 0.0 && l.top.len() == 2));
    let again = s.generate(&prompt, 20, &p, &[], |_| true).unwrap();
    assert_eq!((again.reused_tokens, &again.tokens), (prompt.len() - 1, &full.tokens));
}
