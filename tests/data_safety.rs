//! `convert` / `synth` never lose data: `--force` replaces only a flashmoe store, never the
//! source or a directory holding it; a failure keeps the old store and leaves nothing behind;
//! a second writer to the same target is refused. (The reproducers of the data-safety issue.)

use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::load::load_model;
use flashmoe::tensor::WKind;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn opts(force: bool) -> ConvertOptions {
    ConvertOptions { experts: WKind::Q { bits: 4, group: 64 }, dense: WKind::BF16, force, progress: false }
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn force_never_deletes_the_source_or_unrelated_directories() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("models/q3");
    copy_dir(&fixture("qwen3_moe"), &src);
    std::fs::create_dir_all(d.join("important")).unwrap();
    std::fs::write(d.join("important/notes.txt"), "keep me").unwrap();
    for to in [d.to_path_buf(), d.join("models"), src.clone(), d.join("important")] {
        let e = convert(&src, &to, &opts(true)).err().unwrap_or_else(|| panic!("{} accepted", to.display()));
        let msg = format!("{e:#}");
        assert!(msg.contains("refusing"), "{}: {msg}", to.display());
    }
    assert_eq!(std::fs::read_to_string(d.join("important/notes.txt")).unwrap(), "keep me");
    load_model(&src).expect("the source is intact");
    assert_eq!(names(d), ["important", "models"], "nothing left behind");
}

#[test]
fn a_failing_conversion_keeps_the_old_store_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let out = d.join("out");
    convert(&fixture("qwen3_moe"), &out, &opts(false)).unwrap();
    let before = std::fs::read(out.join("resident.bin")).unwrap();
    // a source whose weights are cut short fails part-way through writing
    let bad = d.join("bad");
    copy_dir(&fixture("qwen3_moe"), &bad);
    let st = bad.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&st).unwrap().set_len(len / 2).unwrap();
    assert!(convert(&bad, &out, &opts(true)).is_err());
    assert_eq!(std::fs::read(out.join("resident.bin")).unwrap(), before, "the old store survives");
    load_model(&out).expect("the old store still loads");
    assert_eq!(names(d), ["bad", "out"], "no partial directory or lock file left");
    // replacing it with a good conversion works and leaves nothing beside it either
    convert(&fixture("qwen3_moe_norm"), &out, &opts(true)).unwrap();
    load_model(&out).unwrap();
    assert_eq!(names(d), ["bad", "out"]);
}

#[test]
fn two_writers_to_one_target_do_not_destroy_each_other() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let results: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> =
            (0..4).map(|_| s.spawn(|| convert(&fixture("qwen3_next"), &out, &opts(true)).is_ok())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().any(|&ok| ok), "one of them wrote the model");
    load_model(&out).expect("the result loads");
    assert_eq!(names(t.path()), ["out"]);
}

/// A manifest edited by hand or by an attacker: huge offsets, paths leaving the store, parts
/// outside their extent. Each is a clear error at load, and `verify` fails on it.
#[test]
fn hostile_manifests_are_refused_without_panicking() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good");
    convert(&fixture("qwen3_moe"), &good, &opts(false)).unwrap();
    let mpath = |d: &Path| d.join(flashmoe::flash::MANIFEST);
    let text = std::fs::read_to_string(mpath(&good)).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 6] = [
        ("huge offset", |m| m["resident"]["tensors"][0]["offset"] = (u64::MAX - 7).into(), "do not fit"),
        ("huge shape", |m| m["resident"]["tensors"][1]["shape"] = serde_json::json!([u64::MAX / 2, 4]), "overflows"),
        ("path outside", |m| m["files"][0]["name"] = "../../etc/passwd".into(), "outside"),
        ("absolute resident", |m| m["resident"]["file"] = "/etc/passwd".into(), "outside"),
        ("part outside extent", |m| m["experts"]["down"]["offset"] = (1u64 << 40).into(), "does not fit"),
        ("stride overflow", |m| m["experts"]["stride"] = (u64::MAX - 4095).into(), "experts"),
    ];
    for (what, edit, want) in cases {
        let d = t.path().join(what.replace(' ', "_"));
        copy_dir(&good, &d);
        let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut m);
        std::fs::write(mpath(&d), serde_json::to_string(&m).unwrap()).unwrap();
        let e = format!("{:#}", load_model(&d).err().unwrap_or_else(|| panic!("{what}: loaded")));
        assert!(e.contains(want), "{what}: {e}");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe"))
            .args(["verify", "--model", d.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{what}: verify {:?} {err}", o.status);
    }
}
