//! The `flashmoe` binary end to end on a fixture: `logits` JSON, `generate`, `inspect`.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn run(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "flashmoe {args:?} failed: {e}");
    (o, e)
}

#[test]
fn logits_prints_one_row_per_token_as_a_prompt_and_incrementally() {
    // every family: the prompt at once (prefill) and one token at a time through the cache
    // (decode), both against the float64 reference's logits of the prompt
    for name in common::FIXTURES {
        let dir = fixture(name);
        let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let prompt: Vec<String> = r["prompt"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
        for extra in [None, Some("--incremental")] {
            let mut args = vec!["logits", "--model", dir.to_str().unwrap(), "--tokens"];
            let tokens = prompt.join(",");
            args.push(&tokens);
            args.extend(extra);
            let (out, _) = run(&args);
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["tokens"], r["prompt"]);
            let got = v["logits"].as_array().unwrap();
            let want = r["prefill_logits"].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                for (a, b) in g.as_array().unwrap().iter().zip(w.as_array().unwrap()) {
                    let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                    assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{name} {extra:?}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn generate_streams_text_and_prints_stats() {
    let dir = fixture("qwen35_vl");
    let (out, err) = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "ROMEO:", "--max-tokens", "5"]);
    assert!(out.starts_with("ROMEO:"), "{out}");
    assert!(err.contains("prompt: ") && err.contains("generated: 5 tokens") && err.contains("tok/s"), "{err}");
    let (_, err) = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--chat",
        "--system",
        "Be brief.",
        "--no-think",
        "--max-tokens",
        "3",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--min-p",
        "0.05",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "7",
        "--experts-per-token",
        "1",
    ]);
    assert!(err.contains("prompt: "), "{err}");
}

#[test]
fn inspect_describes_the_model() {
    let (out, _) = run(&["inspect", "--model", fixture("qwen35_text").to_str().unwrap()]);
    assert!(out.contains("qwen3_5_moe_text") && out.contains("LLLFL") && out.contains("bytes/expert"), "{out}");
    let (out, _) = run(&["inspect", "--model", fixture("qwen3_moe").to_str().unwrap()]);
    assert!(out.contains("fFff"), "{out}");
}

#[test]
fn int4_experts_are_inspected_as_stored_and_kept_by_the_default_conversion() {
    let src = fixture("kimi_k25_int4");
    let (out, _) = run(&["inspect", "--model", src.to_str().unwrap()]);
    // per expert: three [32, 32] projections of 32·32/2 bytes of nibbles, 32 bf16 scales and a
    // 2-element int64 shape each
    let per_expert = 3 * (512 + 64 + 16);
    assert!(out.contains("int4 g32 (compressed-tensors) as stored"), "{out}");
    assert!(out.contains(&format!("bytes/expert   {per_expert} (")), "{out}");
    let tmp = tempfile::tempdir().unwrap();
    let kind = |dir: &std::path::Path| {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("flashmoe.json")).unwrap()).unwrap();
        m["experts"]["kind"].as_str().unwrap().to_string()
    };
    // `--experts q4` (the default) keeps the source's group of 32; another group re-quantizes
    let a = tmp.path().join("a");
    run(&["convert", "--from", src.to_str().unwrap(), "--to", a.to_str().unwrap()]);
    assert_eq!(kind(&a), "q4g32");
    let b = tmp.path().join("b");
    run(&["convert", "--from", src.to_str().unwrap(), "--to", b.to_str().unwrap(), "--group-size", "64"]);
    assert_eq!(kind(&b), "q4g64");
    let c = tmp.path().join("c");
    run(&["convert", "--from", src.to_str().unwrap(), "--to", c.to_str().unwrap(), "--experts", "q8"]);
    assert_eq!(kind(&c), "q8g64");
}

#[test]
fn chat_keeps_state_between_turns_and_answers_commands() {
    let cache = tempfile::tempdir().unwrap();
    let save = cache.path().join("conv.json");
    let script = format!("Speak as ROMEO.\nSpeak as JULIET.\n/stats\n/save {}\n/reset\n/exit\n", save.display());
    let out = chat_session(
        &["chat", "--model", flashmoe::builtin::SOURCE, "--max-tokens", "12", "--system", "Be brief."],
        cache.path(),
        &script,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // two answers with stats lines; the second reused the first turn's tokens
    let stats: Vec<&str> = err.lines().filter(|l| l.contains("prompt tokens (")).collect();
    assert_eq!(stats.len(), 3, "two answers and /stats repeating the last: {err}");
    assert!(stats[0].contains("(0 reused)") && !stats[1].contains("(0 reused)"), "{err}");
    assert!(err.contains("cached tokens:") && err.contains("conversation cleared"), "{err}");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&save).unwrap()).unwrap();
    assert_eq!(saved["messages"].as_array().unwrap().len(), 4);
    assert_eq!(saved["system"], "Be brief.");
}

/// Runs `flashmoe chat ARGS` with HOME at `home`, typing `script`, and returns when it exits.
fn chat_session(args: &[&str], home: &std::path::Path, script: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(args)
        .env("HOME", home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// A conversation that outgrows the context drops its oldest turns and goes on (the built-in
/// model has 1024 positions; each turn here is ~400 tokens).
#[test]
fn chat_past_the_context_drops_the_oldest_turns() {
    let cache = tempfile::tempdir().unwrap();
    let long = "O Romeo, Romeo, wherefore art thou Romeo? ".repeat(40);
    let script = format!("{long}\n{long}\n{long}\n{long}\n/exit\n");
    let out = chat_session(&["chat", "--model", flashmoe::builtin::SOURCE, "--max-tokens", "8"], cache.path(), &script);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let answers = err.lines().filter(|l| l.contains("prompt tokens (")).count();
    assert_eq!(answers, 4, "every turn answered: {err}");
    assert!(err.contains("oldest messages to fit the context"), "{err}");
    assert!(!err.contains("error:"), "{err}");
}

/// A chat-template error drops that turn only; a bad `/load` leaves the conversation as it was.
#[test]
fn chat_survives_template_errors_and_bad_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(flashmoe::builtin::SOURCE).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
    }
    // the template refuses any message containing BOOM
    let tpl = model.join("chat_template.jinja");
    let text = std::fs::read_to_string(&tpl).unwrap();
    let guard = "{%- for m in messages %}{% if 'BOOM' in m.content %}{{ raise_exception('no BOOM here') }}{% endif %}{% endfor -%}\n";
    std::fs::write(&tpl, format!("{guard}{text}")).unwrap();
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"system": "x"}"#).unwrap();
    let script = format!("Speak as ROMEO.\nBOOM\n/load {}\n/load /dev/zero\nSpeak as JULIET.\n/exit\n", bad.display());
    let out = chat_session(&["chat", "--model", model.to_str().unwrap(), "--max-tokens", "6"], tmp.path(), &script);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no BOOM here"), "{err}");
    assert!(err.contains("no `messages` list") && err.contains("not a regular file"), "{err}");
    // both good turns answered; the second still reuses the first (the conversation survived)
    let stats: Vec<&str> = err.lines().filter(|l| l.contains("prompt tokens (")).collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert!(!stats[1].contains("(0 reused)"), "{err}");
}

#[test]
fn bench_cold_says_whether_the_expert_files_left_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let (src, dst) = (fixture("qwen3_moe"), out.to_str().unwrap().to_string());
    run(&["convert", "--from", src.to_str().unwrap(), "--to", &dst, "--experts", "q4"]);
    let bench = || run(&["bench", "--model", &dst, "--cold", "--prompt-tokens", "4", "--gen-tokens", "2"]).0;
    let o = bench();
    assert!(o.contains("cold start       expert files dropped"), "{o}");
    // mapped and touched by this process, the files cannot leave the page cache
    let maps: Vec<memmap2::Mmap> = std::fs::read_dir(out.join("experts"))
        .unwrap()
        .map(|e| unsafe { memmap2::Mmap::map(&std::fs::File::open(e.unwrap().path()).unwrap()).unwrap() })
        .collect();
    let touched: u64 = maps.iter().map(|m| m.iter().step_by(4096).map(|&b| b as u64).sum::<u64>()).sum();
    std::hint::black_box(touched);
    let o = bench();
    assert!(o.contains("NOT cold"), "{o}");
    let j: Value = serde_json::from_str(
        &run(&["bench", "--model", &dst, "--cold", "--prompt-tokens", "4", "--gen-tokens", "2", "--json"]).0,
    )
    .unwrap();
    assert!(j["cold_resident_fraction"].as_f64().unwrap() > 0.5, "{j}");
}

#[test]
fn synth_help_names_every_preset_and_inspect_explains_latent_attention() {
    let (help, _) = run(&["synth", "--help"]);
    for p in flashmoe::families::presets() {
        assert!(help.contains(p), "synth --help does not name preset {p}");
    }
    let (out, _) = run(&["inspect", "--model", fixture("glm_moe_dsa").to_str().unwrap()]);
    assert!(out.contains("latent (MLA): 4 heads, q LoRA rank 16"), "{out}");
    assert!(out.contains("latent cache   64 B per token"), "{out}");
    assert!(out.contains("own in 2 of 4 layers"), "{out}");
}

#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["inspect", "--model", fixture("qwen3_next").to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs flashmoe with its stderr on a pseudo-terminal (100 columns) and stdout piped, with
/// `$XDG_CACHE_HOME` at `cache`; returns stdout and everything the terminal received.
fn run_on_terminal(args: &[&str], cache: &Path) -> (String, String) {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(master >= 0, "posix_openpt failed");
    let mut name = [0 as libc::c_char; 128];
    unsafe {
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        assert_eq!(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), 0);
        let size = libc::winsize { ws_row: 40, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 };
        assert_eq!(libc::ioctl(master, libc::TIOCSWINSZ, &size), 0);
    }
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_str().unwrap().to_owned();
    let mut master = unsafe { std::fs::File::from_raw_fd(master) };
    // the terminal must be drained while the command runs, or a full buffer would block it
    let reader = std::thread::spawn(move || {
        let (mut all, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = master.read(&mut buf) {
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let out = {
        let tty = std::fs::OpenOptions::new().read(true).write(true).open(&name).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_flashmoe"));
        c.args(args).env("TERM", "xterm").env("XDG_CACHE_HOME", cache).env_remove("FLASHMOE_MODEL").stderr(tty);
        c.output().unwrap()
    }; // every handle on the terminal's far end is closed here, so the reader sees its end
    let shown = reader.join().unwrap();
    assert!(out.status.success(), "flashmoe {args:?} failed: {shown}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), shown)
}

#[test]
fn progress_is_drawn_on_a_terminal_and_nowhere_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, m) = (tmp.path().join("cache"), tmp.path().join("m"));
    let (src, dst) = (fixture("qwen3_moe"), m.to_str().unwrap().to_string());
    // a bar ends with its template's tail; the terminal keeps what a command printed besides
    let (_, shown) = run_on_terminal(&["convert", "--from", src.to_str().unwrap(), "--to", &dst], &cache);
    assert!(shown.contains("tensors+experts") && shown.contains("converted"), "{shown}");
    let bench = ["bench", "--model", &dst, "--cold", "--prompt-tokens", "4", "--gen-tokens", "3"];
    let (out, shown) = run_on_terminal(&bench, &cache);
    assert!(out.contains("decode           3 tokens"), "{out}");
    for part in ["loading ", "prefill of 4 tokens", "    decode [", "/3 tokens"] {
        assert!(shown.contains(part), "bench on a terminal lacks `{part}`: {shown:?}");
    }
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "ROMEO: But soft, what light through yonder window breaks?\n".repeat(4)).unwrap();
    let eval = ["eval", "--model", &dst, "--text", text.to_str().unwrap(), "--window", "16"];
    let (out, shown) = run_on_terminal(&eval, &cache);
    assert!(out.starts_with("perplexity"), "{out}");
    assert!(shown.contains("      eval [") && shown.contains(" tokens, "), "{shown:?}");
    // the built-in model's first-run conversion, into an empty cache directory
    let (_, shown) = run_on_terminal(&["generate", "--prompt", "ROMEO:", "--max-tokens", "2"], &cache);
    assert!(shown.contains("first run") && shown.contains("tensors+experts"), "{shown:?}");
    // piped, the same commands print what they always did, without a bar's escapes or returns
    for args in [&bench[..], &eval[..]] {
        let (_, err) = run(args);
        assert!(!err.contains('\r') && !err.contains('\x1b') && !err.contains("loading "), "{args:?}: {err:?}");
    }
}

/// `scripts/memcg.sh` (the beyond-RAM scripts' memory cgroup) on fake cgroup trees: v1, v2
/// and v2 under a hybrid host's `unified`, each given the limit in its own file; no hierarchy
/// with a memory controller is a clear error naming what was looked at.
#[test]
fn the_memory_cgroup_helper_detects_cgroup_v1_and_v2() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/memcg.sh");
    let run = |fs: &Path| {
        let cmd = format!(
            ". '{}' && memcg_init 64M && (memcg_run sh -c 'echo inside') && echo \"v$MEMCG_V $MEMCG\"",
            script.display()
        );
        let out = Command::new("bash").arg("-c").arg(cmd).env("CGROUP_FS", fs).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let tmp = tempfile::tempdir().unwrap();
    // v1: the memory controller's own hierarchy
    let v1 = tmp.path().join("v1");
    std::fs::create_dir_all(v1.join("memory")).unwrap();
    let (ok, out, err) = run(&v1);
    assert!(ok, "{err}");
    let cg = v1.join("memory/flashmoe_bench");
    assert_eq!(out, format!("inside\nv1 {}\n", cg.display()));
    assert_eq!(read(cg.join("memory.limit_in_bytes")).trim(), "67108864");
    assert!(!read(cg.join("cgroup.procs")).trim().is_empty(), "the command's shell joined the cgroup");
    // v2, at the root or under `unified`
    for sub in ["", "unified"] {
        let fs = tmp.path().join(format!("v2{sub}"));
        let root = fs.join(sub);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        let (ok, out, err) = run(&fs);
        assert!(ok, "{err}");
        let cg = root.join("flashmoe_bench");
        assert_eq!(out, format!("inside\nv2 {}\n", cg.display()));
        assert_eq!(read(cg.join("memory.max")).trim(), "67108864");
        assert_eq!(read(root.join("cgroup.subtree_control")).trim(), "+memory");
    }
    // v2 without the memory controller (a hybrid host where v1 holds it, unwritable), none
    let fs = tmp.path().join("nomem");
    std::fs::create_dir_all(fs.join("unified")).unwrap();
    std::fs::write(fs.join("unified/cgroup.controllers"), "cpu pids\n").unwrap();
    let (ok, _, err) = run(&fs);
    assert!(!ok && err.contains("has no memory controller") && err.contains("unified/cgroup.controllers"), "{err}");
    let (ok, _, err) = run(&tmp.path().join("empty"));
    assert!(!ok && err.contains("no cgroup v1 memory controller"), "{err}");
}

/// `--kv-cache`: `logits` keeps an f32 cache unless asked, `bench` defaults to bf16 and reports
/// the type and the cache bytes a decode token reads, `--exact` refuses a 16-bit type by name.
#[test]
fn kv_cache_flag_chooses_the_cache_type() {
    let dir = fixture("qwen3_moe");
    let d = dir.to_str().unwrap();
    let logits = |extra: &[&str]| {
        let mut a = vec!["logits", "--model", d, "--tokens", "1,2,3,4,5,6", "--incremental"];
        a.extend(extra);
        run(&a).0
    };
    assert_eq!(logits(&[]), logits(&["--kv-cache", "f32"]));
    assert_ne!(logits(&[]), logits(&["--kv-cache", "bf16"]));
    // 4 attention layers of 2 KV heads of 12: keys and values, 2 or 4 bytes each
    for (extra, ty, bytes) in [(None, "bf16", 2), (Some("f32"), "f32", 4), (Some("f16"), "f16", 2)] {
        let mut a = vec!["bench", "--model", d, "--prompt-tokens", "5", "--gen-tokens", "3", "--json"];
        if let Some(t) = extra {
            a.extend(["--kv-cache", t]);
        }
        let j: Value = serde_json::from_str(&run(&a).0).unwrap();
        assert_eq!(j["kv_cache"], ty, "{j}");
        let pos = j["prompt_tokens"].as_u64().unwrap() + j["gen_tokens"].as_u64().unwrap();
        assert_eq!(j["kv_bytes_per_token"].as_f64().unwrap(), (pos * 4 * 2 * 2 * 12 * bytes) as f64, "{j}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["generate", "--model", d, "--prompt", "Hi", "--max-tokens", "1", "--exact", "--kv-cache", "bf16"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--exact") && e.contains("--kv-cache bf16"), "{e}");
}
