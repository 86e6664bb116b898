//! The released chat templates of Qwen3.5, Qwen3-Coder, Qwen3, GLM-4.6/4.7, MiniMax-M2, gpt-oss,
//! DeepSeek R1/V3.1/V3.2 and Kimi-K2 render exactly as transformers renders them (tests/chat_templates.py, in a venv of its own with transformers
//! from PyPI; the templates come from the llama-cpp-python sdist at test time), and the tool
//! calls they write parse back into the calls they were given.

use flashmoe::tokenizer::render_template;
use flashmoe::toolcall::{ToolCall, ToolFormat, parse};
use serde_json::Value;
use std::path::Path;

/// The Python of a venv under target/ holding transformers (created on first use).
fn python() -> std::path::PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/templates-venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        let ok = std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv).status().unwrap().success();
        assert!(ok, "python3 -m venv failed");
    }
    let has = std::process::Command::new(&py)
        .args(["-c", "import transformers.utils.chat_template_utils"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    if !has {
        let ok = std::process::Command::new(&py)
            .args(["-m", "pip", "install", "-q", "transformers==5.17.0", "jinja2"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install transformers failed (PyPI must be reachable)");
    }
    py
}

#[test]
fn released_templates_render_as_transformers_renders_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/templates");
    let out = dir.join("cases.json");
    let ok = std::process::Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat_templates.py"))
        .arg(&dir)
        .arg(&out)
        .status()
        .unwrap()
        .success();
    assert!(ok, "tests/chat_templates.py failed");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let cases = d["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 13 * 8);
    let mut wrong = vec![];
    for c in cases {
        let name = c["template"].as_str().unwrap();
        let conv = &d["conversations"][c["conv"].as_u64().unwrap() as usize];
        let src = d["templates"][name].as_str().unwrap();
        let mut extra = serde_json::Map::new();
        for (k, v) in conv.as_object().unwrap() {
            if !["messages", "tools", "add_generation_prompt"].contains(&k.as_str()) {
                extra.insert(k.clone(), v.clone());
            }
        }
        let generation = conv["add_generation_prompt"].as_bool().unwrap_or(false);
        let got =
            render_template(src, &conv["messages"], conv.get("tools"), generation, Some("<s>"), Some("</s>"), &extra);
        if let Value::String(want) = &c["rendered"]
            && !src.contains("bos_token")
            && !src.contains("eos_token")
        {
            // the `template` command prints the same, byte for byte (its special tokens come
            // from the model's tokenizer, so only templates that use none)
            let cli = cli_render(&dir, src, conv, &extra, generation);
            if &cli != want {
                wrong.push(format!("flashmoe template: {name}, {}:\n{cli}\n--- transformers:\n{want}", c["conv"]));
            }
        }
        match (&c["rendered"], got) {
            (Value::String(want), Ok(got)) if &got == want => {}
            (Value::Null, Err(_)) => {}
            (want, got) => {
                wrong.push(format!("{name}, conversation {}: transformers {want:?}, flashmoe {got:?}", c["conv"]))
            }
        }
    }
    assert!(wrong.is_empty(), "{} of {} renderings differ:\n{}", wrong.len(), cases.len(), wrong.join("\n\n"));
    // the assistant's calls in conversations 2 and 6, as each template wrote them, parse back
    let call = |city: &str, days: u32| ToolCall {
        name: "get_weather".into(),
        arguments: format!(r#"{{"city":"{city}","days":{days}}}"#),
    };
    // (conversation 7 gives the arguments as a JSON string: DeepSeek V3.2 reads it with `from_json`)
    let rome = ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Rome","days":3}"#.into() };
    let v32 = cases.iter().find(|c| c["template"] == "deepseek-ai-DeepSeek-V3.2" && c["conv"] == 7).unwrap();
    assert_eq!(parse(v32["rendered"].as_str().unwrap(), ToolFormat::DeepSeek).1, vec![rome.clone()]);
    for (name, f) in [
        ("Qwen3.5-4B", ToolFormat::Qwen),
        ("Qwen3-Coder", ToolFormat::Qwen),
        ("Qwen-Qwen3-0.6B", ToolFormat::Qwen),
        ("GLM-4.6", ToolFormat::Glm),
        ("GLM-4.7-Flash", ToolFormat::Glm),
        ("MiniMax-M2", ToolFormat::MiniMax),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", ToolFormat::DeepSeek),
        ("deepseek-ai-DeepSeek-V3.1", ToolFormat::DeepSeek),
        ("deepseek-ai-DeepSeek-V3.2", ToolFormat::DeepSeek),
        ("moonshotai-Kimi-K2", ToolFormat::Kimi),
    ] {
        for (conv, want) in [(2, vec![call("Paris", 2)]), (6, vec![call("Paris", 2), call("Rome", 1)])] {
            let c = cases.iter().find(|c| c["template"] == name && c["conv"] == conv).unwrap();
            // from the user's question on: Qwen3.5's tool instructions show an example call
            let (rendered, question) =
                (c["rendered"].as_str().unwrap(), d["conversations"][conv]["messages"][0]["content"].as_str().unwrap());
            let (_, calls) = parse(&rendered[rendered.find(question).unwrap()..], f);
            assert_eq!(calls, want, "{name}, conversation {conv}");
        }
    }
}

/// `flashmoe template` on the built-in model with `src` as its template.
fn cli_render(dir: &Path, src: &str, conv: &Value, extra: &serde_json::Map<String, Value>, generation: bool) -> String {
    let (t, m) = (dir.join("cli-template.jinja"), dir.join("cli-messages.json"));
    std::fs::write(&t, src).unwrap();
    std::fs::write(
        &m,
        serde_json::to_string(&serde_json::json!({"messages": conv["messages"], "tools": conv.get("tools")})).unwrap(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe"));
    cmd.arg("template").arg("--template").arg(&t).arg("--messages").arg(&m);
    for (k, v) in extra {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    if !generation {
        cmd.arg("--no-generation-prompt");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "flashmoe template: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn from_json_reads_a_json_text_in_order_and_names_bad_input() {
    let msgs = serde_json::json!([{"role": "user", "content": "{\"b\": 1, \"a\": [2, \"x\"]}"}]);
    let render = |t: &str| render_template(t, &msgs, None, false, None, None, &serde_json::Map::new());
    let t = "{% for k, v in (messages[0].content | from_json).items() %}{{ k }}={{ v | tojson }};{% endfor %}";
    assert_eq!(render(t).unwrap(), "b=1;a=[2, \"x\"];");
    let bad = serde_json::json!([{"role": "user", "content": "{not json"}]);
    let e =
        render_template("{{ messages[0].content | from_json }}", &bad, None, false, None, None, &Default::default())
            .unwrap_err();
    assert!(format!("{e:#}").contains("from_json: not JSON"), "{e:#}");
}

#[test]
fn tojson_escapes_non_ascii_only_when_asked() {
    let msgs = serde_json::json!([{"role": "user", "content": "café 東京 🙂"}]);
    let render = |t: &str| render_template(t, &msgs, None, false, None, None, &serde_json::Map::new()).unwrap();
    assert_eq!(render("{{ messages[0].content|tojson }}"), "\"café 東京 🙂\"");
    // Python's json.dumps(ensure_ascii=True): UTF-16 escapes, a surrogate pair for the emoji
    assert_eq!(
        render("{{ messages[0].content|tojson(ensure_ascii=True) }}"),
        "\"caf\\u00e9 \\u6771\\u4eac \\ud83d\\ude42\""
    );
}
