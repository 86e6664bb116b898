//! Tokenizer and chat template against transformers' own encoding and rendering
//! (tests/fixtures/tokenizer_reference.json, made by scripts/make_fixtures.py).

use flashmoe::tokenizer::{StreamDecoder, TextTokenizer, render_template};
use serde_json::{Value, json};
use std::path::Path;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_reference.json")).unwrap()).unwrap()
}

#[test]
fn encode_and_decode_match_transformers() {
    let tok = TextTokenizer::load(&fixtures().join("qwen35_text")).unwrap();
    for case in reference()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text);
    }
    assert_eq!(tok.eos_id(), tok.token_to_id("<|im_end|>"));
}

#[test]
fn chat_template_renders_like_transformers() {
    let tok = TextTokenizer::load(&fixtures().join("qwen35_text")).unwrap();
    assert!(tok.has_chat_template());
    for case in reference()["chat"].as_array().unwrap() {
        let mut extra = serde_json::Map::new();
        if let Some(v) = case.get("enable_thinking") {
            extra.insert("enable_thinking".into(), v.clone());
        }
        let got = tok
            .apply_chat_template(
                &case["messages"],
                case.get("tools"),
                case["add_generation_prompt"].as_bool().unwrap(),
                &extra,
            )
            .unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap());
    }
}

#[test]
fn template_features_and_errors() {
    let none = serde_json::Map::new();
    let msgs = json!([{"role": "user", "content": "  Hi  "}]);
    let t = "{%- set ns = namespace(n=0) -%}{% for m in messages %}{% if loop.first %}{% set ns.n = 1 %}{% continue %}{% endif %}{% endfor %}\
             {{ ns.n }}|{{ messages[0].content.strip() }}|{{ 'a,b'.split(',') | tojson }}|{{ {'k': 'é\"<'} | tojson }}|\
             {{ messages[0].content.startswith('  H') }}|{{ {'a': [1, 2]} | tojson(indent=2) }}";
    let out = render_template(t, &msgs, None, false, None, None, &none).unwrap();
    assert_eq!(out, "1|Hi|[\"a\", \"b\"]|{\"k\": \"é\\\"<\"}|True|{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    let e = render_template("{{ raise_exception('bad role') }}", &msgs, None, false, None, None, &none).unwrap_err();
    assert!(format!("{e:#}").contains("bad role"));
    let e = render_template("{% if %}", &msgs, None, false, None, None, &none).unwrap_err();
    assert!(format!("{e:#}").contains("does not parse"));
}

#[test]
fn stream_decoder_never_splits_characters() {
    let tok = TextTokenizer::load(&fixtures().join("qwen35_text")).unwrap();
    let text = "café 東京 🙂 done";
    let ids = tok.encode(text).unwrap();
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for id in ids {
        out.push_str(&dec.push(&tok, id).unwrap());
    }
    assert_eq!(out, text);
}

/// A token's bytes, even those that split a character: together they are the text's bytes.
#[test]
fn token_bytes_make_up_the_text() {
    let tok = TextTokenizer::load(&fixtures().join("qwen35_text")).unwrap();
    for text in ["ROMEO: wherefore art thou?", "naïve café", "日本語のテキスト", "emoji 🦀🎭!", "<|im_end|> tail"]
    {
        let ids = tok.encode(text).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&t| tok.token_bytes(t)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        for &t in &ids {
            let (b, s) = (tok.token_bytes(t), tok.token_text(t));
            match std::str::from_utf8(&b) {
                Ok(whole) => assert_eq!(s, whole),
                Err(_) => assert!(s.starts_with("bytes:\\x"), "{s}"),
            }
        }
    }
}
