//! Progress on the terminal: bars and spinners drawn on stderr only when it is a terminal, so
//! tests, pipes and logs see nothing of them (a hidden bar costs an atomic add per step).

use indicatif::{ProgressBar, ProgressStyle};
use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

/// Whether progress is drawn at all: stderr is a terminal.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A spinner with `msg` and the elapsed time, for a step of unknown length (loading a model,
/// a prompt's prefill). It ticks on its own thread; `finish_and_clear` removes it.
pub fn spinner(msg: impl Into<Cow<'static, str>>) -> ProgressBar {
    if !on_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("template"));
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A bar of `len` steps counted in `unit`s, e.g. `bar(64, "decode", "tokens")`.
pub fn bar(len: u64, msg: impl Into<Cow<'static, str>>, unit: &str) -> ProgressBar {
    if !on_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg:>10}} [{{bar:40}}] {{pos}}/{{len}} {unit}, {{elapsed}} (eta {{eta}})"
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}
