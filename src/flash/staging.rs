//! Writing a store safely: `convert` and `synth` write into a hidden staging directory beside
//! the target, under a lock, and swap it into place only once it is complete and verified.
//!
//! - `--force` replaces only an existing flashmoe store (its manifest present), never the source
//!   checkpoint or a directory containing it; anything else is refused.
//! - The old store survives every failure: the new one is built beside it and exchanged with it
//!   atomically (`renameat2(RENAME_EXCHANGE)`, or two renames where the filesystem lacks it).
//! - Every error path removes the staging directory (a `kill -9` leaves it: the next run for the
//!   same target removes it, recognising it by its marker file).
//! - Free space is checked against the expected size before anything is written.
//! - Two runs for one target: the second is refused while the first holds the lock.

use super::MANIFEST;
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Written into every staging directory: a stale one is removed only if it holds this.
const MARKER: &str = ".flashmoe-partial";

/// A store being written. Dropping it before [`Staging::publish`] removes what it wrote.
pub struct Staging {
    /// Where to write the new store's files.
    pub dir: PathBuf,
    to: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    /// `dir` is this run's to remove (created by it; a foreign directory of that name is not).
    owned: bool,
    published: bool,
}

fn hidden(to: &Path, suffix: &str) -> PathBuf {
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    to.with_file_name(format!(".{name}.{suffix}"))
}

/// `p` made absolute with its existing ancestors resolved (for containment checks of a path
/// that may not exist yet).
fn resolved(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    let mut tail = vec![];
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            out.extend(tail.iter().rev());
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Bytes free for this user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is valid output space; `c` is a NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

impl Staging {
    /// Checks that `to` may be written (replacing a flashmoe store only with `force`, never one
    /// of `sources` or a directory containing one), takes the target's lock, removes a stale
    /// staging directory of an interrupted run, checks that `expected_bytes` fit, and creates
    /// the staging directory.
    pub fn begin(to: &Path, force: bool, sources: &[&Path], expected_bytes: u64) -> Result<Staging> {
        let target = resolved(to);
        for s in sources {
            let s = resolved(s);
            if s.starts_with(&target) {
                bail!(
                    "--to {} is {} the source {}: refusing to write there",
                    to.display(),
                    if s == target { "the same directory as" } else { "a directory containing" },
                    s.display()
                );
            }
        }
        if to.exists() {
            if !force {
                bail!("{} already exists (use --force to replace a flashmoe model there)", to.display());
            }
            if !to.is_dir() || !to.join(MANIFEST).is_file() {
                bail!(
                    "--force replaces only a flashmoe model directory (one with {MANIFEST}); {} is not one: \
                     refusing to delete it",
                    to.display()
                );
            }
        }
        let parent = target.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let lock_path = hidden(to, "lock");
        let lock = lock_file(&lock_path, to)?;
        let dir = hidden(to, "partial");
        // from here on, dropping `st` (an error) releases the lock and removes what was written
        let mut st =
            Staging { dir: dir.clone(), to: to.to_path_buf(), lock_path, _lock: lock, owned: false, published: false };
        if dir.exists() {
            if !dir.join(MARKER).exists() {
                bail!("{} exists but was not written by flashmoe: refusing to delete it (move it away)", dir.display());
            }
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {} (left by an interrupted run)", dir.display()))?;
        }
        let margin = 64 << 20;
        if let Some(free) = free_bytes(&parent)
            && free < expected_bytes + margin
        {
            bail!(
                "not enough free space for {}: it needs about {}, {} has {} free{}",
                to.display(),
                gb(expected_bytes),
                parent.display(),
                gb(free),
                if to.exists() { " (the old model stays until the new one is complete)" } else { "" }
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        st.owned = true;
        std::fs::write(dir.join(MARKER), b"").with_context(|| format!("cannot write in {}", dir.display()))?;
        Ok(st)
    }

    /// Puts the complete staging directory in place of the target; an old store there is
    /// exchanged atomically and then removed.
    pub fn publish(mut self) -> Result<()> {
        let (dir, to) = (self.dir.clone(), self.to.clone());
        std::fs::remove_file(dir.join(MARKER)).with_context(|| format!("cannot finish {}", dir.display()))?;
        if !to.exists() {
            std::fs::rename(&dir, &to)
                .with_context(|| format!("cannot rename {} to {}", dir.display(), to.display()))?;
        } else if exchange(&dir, &to).is_err() {
            // no atomic exchange on this filesystem: old aside, new in, old removed
            let old = hidden(&to, "old");
            if old.exists() {
                std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
            }
            std::fs::rename(&to, &old).with_context(|| format!("cannot move {} aside", to.display()))?;
            if let Err(e) = std::fs::rename(&dir, &to) {
                let _ = std::fs::rename(&old, &to);
                return Err(e).with_context(|| format!("cannot rename {} to {}", dir.display(), to.display()));
            }
            self.dir = old;
        }
        // `self.dir` now holds the replaced store (or nothing): dropping removes it
        self.published = true;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).with_context(|| {
                format!("the new model is in place, but the old one at {} could not be removed", self.dir.display())
            })?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published && self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        // removed while still held: a run that opened it meanwhile sees a stale inode and retries
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Atomically exchanges two paths (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let (ca, cb) =
            (std::ffi::CString::new(a.as_os_str().as_bytes())?, std::ffi::CString::new(b.as_os_str().as_bytes())?);
        // SAFETY: two NUL-terminated paths, relative to the working directory.
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// An exclusive `flock` on `path` (created if absent); refused at once if another run holds it.
fn lock_file(path: &Path, to: &Path) -> Result<File> {
    loop {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot create the lock file {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another flashmoe convert or synth is writing {} (it holds {}); wait for it to finish",
                to.display(),
                path.display()
            );
        }
        // the holder before us may have removed the file after we opened it: lock the live one
        let same = match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => std::os::unix::fs::MetadataExt::ino(&a) == std::os::unix::fs::MetadataExt::ino(&b),
            _ => false,
        };
        if same {
            return Ok(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(MANIFEST), "{}").unwrap();
        std::fs::write(dir.join("resident.bin"), "old").unwrap();
    }

    #[test]
    fn force_replaces_only_flashmoe_stores_and_never_a_source() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir_all(d.join("important")).unwrap();
        std::fs::write(d.join("important/notes.txt"), "keep").unwrap();
        std::fs::create_dir_all(d.join("models/q3")).unwrap();
        let src = d.join("models/q3");
        // a directory that is no store, an ancestor of the source, the source itself
        for to in [d.join("important"), d.to_path_buf(), src.clone(), d.join("models")] {
            let e = Staging::begin(&to, true, &[&src], 0).err().expect("refused").to_string();
            assert!(e.contains("refusing") || e.contains("source"), "{}: {e}", to.display());
        }
        assert_eq!(std::fs::read_to_string(d.join("important/notes.txt")).unwrap(), "keep");
        // an existing store without --force
        store(&d.join("out"));
        assert!(Staging::begin(&d.join("out"), false, &[&src], 0).is_err());
    }

    #[test]
    fn failure_keeps_the_old_store_and_publish_swaps() {
        let t = tempfile::tempdir().unwrap();
        let to = t.path().join("m");
        store(&to);
        {
            let s = Staging::begin(&to, true, &[], 0).unwrap();
            std::fs::write(s.dir.join("resident.bin"), "half").unwrap();
            // dropped without publishing: an error part-way
        }
        assert_eq!(std::fs::read_to_string(to.join("resident.bin")).unwrap(), "old");
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m")], "nothing left beside it");
        let s = Staging::begin(&to, true, &[], 0).unwrap();
        std::fs::write(s.dir.join(MANIFEST), "{}").unwrap();
        std::fs::write(s.dir.join("resident.bin"), "new").unwrap();
        s.publish().unwrap();
        assert_eq!(std::fs::read_to_string(to.join("resident.bin")).unwrap(), "new");
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m")]);
    }

    #[test]
    fn second_writer_is_refused_and_stale_partials_are_cleaned() {
        let t = tempfile::tempdir().unwrap();
        let to = t.path().join("m");
        let a = Staging::begin(&to, false, &[], 0).unwrap();
        let e = Staging::begin(&to, false, &[], 0).err().expect("locked").to_string();
        assert!(e.contains("another flashmoe"), "{e}");
        drop(a);
        // what kill -9 leaves: a marked partial directory and a lock file nobody holds
        let partial = hidden(&to, "partial");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join(MARKER), b"").unwrap();
        std::fs::write(partial.join("resident.bin"), b"half").unwrap();
        std::fs::write(hidden(&to, "lock"), b"").unwrap();
        let b = Staging::begin(&to, false, &[], 0).unwrap();
        assert!(!partial.join("resident.bin").exists(), "the stale partial was removed");
        drop(b);
        // a foreign directory of that name is not deleted
        let t2 = tempfile::tempdir().unwrap();
        let to2 = t2.path().join("m");
        std::fs::create_dir_all(hidden(&to2, "partial")).unwrap();
        assert!(Staging::begin(&to2, false, &[], 0).is_err());
        assert!(hidden(&to2, "partial").exists());
    }

    #[test]
    fn free_space_is_checked_first() {
        let t = tempfile::tempdir().unwrap();
        let e = Staging::begin(&t.path().join("m"), false, &[], u64::MAX / 4).err().expect("no room").to_string();
        assert!(e.contains("not enough free space"), "{e}");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
