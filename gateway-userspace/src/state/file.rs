//! The state file `DIR/state.json`: loaded at start, written atomically after every change,
//! locked so that one daemon uses a state directory, never overwritten when it cannot be read.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{STATE_FORMAT, State};

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error(
        "the state file {path} is corrupt ({source}); it was left as it is: repair it, or move it away to start with no apps"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the state file {path} has format {found}, this build reads format {STATE_FORMAT}; it was left as it is"
    )]
    Format { path: PathBuf, found: u32 },
    #[error("{what} {path} failed")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another daemon holds {path}")]
    Locked { path: PathBuf },
}

impl StateFileError {
    /// [`StateFileError::Io`] for doing `what` to `path`, from the error it gives.
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| StateFileError::Io { what, path, source }
    }
}

/// The state file `DIR/state.json`, locked by this process while it lives (one daemon per
/// state directory).
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    _lock: File,
}

impl StateFile {
    /// Opens (creating) directory `dir` and locks it.
    pub fn open(dir: &Path) -> Result<Self, StateFileError> {
        fs::create_dir_all(dir).map_err(StateFileError::io("creating the state directory", dir))?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StateFileError::io("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StateFileError::Locked { path: lock_path });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(StateFileError::io("locking", &lock_path)(e));
            }
        }
        Ok(StateFile {
            path: dir.join("state.json"),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; an empty one when there is no file yet.
    pub fn load(&self) -> Result<State, StateFileError> {
        let text = match fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(StateFileError::io("reading", &self.path)(e)),
        };
        let corrupt = |source| StateFileError::Corrupt {
            path: self.path.clone(),
            source,
        };
        // The format first, so that a newer file is named as such rather than as corrupt.
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let Format { format } = serde_json::from_slice(&text).map_err(corrupt)?;
        if format != STATE_FORMAT {
            return Err(StateFileError::Format {
                path: self.path.clone(),
                found: format,
            });
        }
        serde_json::from_slice(&text).map_err(corrupt)
    }

    /// Saves `state`: written to a temporary file, synced, renamed over the old one, and the
    /// directory synced, so a crash leaves either the old or the new state, never a mix.
    pub fn save(&self, state: &State) -> Result<(), StateFileError> {
        let tmp = self.path.with_extension("json.tmp");
        let mut text = serde_json::to_vec_pretty(state).expect("the state serializes");
        text.push(b'\n');
        let mut file = File::create(&tmp).map_err(StateFileError::io("creating", &tmp))?;
        file.write_all(&text)
            .map_err(StateFileError::io("writing", &tmp))?;
        file.sync_all()
            .map_err(StateFileError::io("syncing", &tmp))?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(StateFileError::io("renaming over", &self.path))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(StateFileError::io("syncing", dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{
        ClientAddress, RateLimit,
        tests::{RANGE, addr},
    };

    /// A state file in a fresh directory of its own (`tag`: the test's), removed on drop, a
    /// failed test's too.
    struct TempFile {
        dir: PathBuf,
        file: StateFile,
    }

    impl TempFile {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("gateway-state-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            let file = StateFile::open(&dir).unwrap();
            TempFile { dir, file }
        }
    }

    impl std::ops::Deref for TempFile {
        type Target = StateFile;
        fn deref(&self) -> &StateFile {
            &self.file
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn the_state_file_round_trips_and_a_corrupt_one_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("gateway-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let file = StateFile::open(&dir).unwrap();
        assert!(matches!(
            StateFile::open(&dir),
            Err(StateFileError::Locked { .. })
        ));
        assert_eq!(file.load().unwrap(), State::default());
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        s.add_backend("a", addr("198.51.100.2:80"), 3).unwrap();
        file.save(&s).unwrap();
        assert_eq!(file.load().unwrap(), s);
        assert!(!dir.join("state.json.tmp").exists());

        fs::write(file.path(), b"{\"format\": 1, \"apps\": {").unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("line 1"), "{err}");
        assert_eq!(
            fs::read(file.path()).unwrap(),
            b"{\"format\": 1, \"apps\": {"
        );
        fs::write(file.path(), b"{\"format\": 2}").unwrap();
        assert!(matches!(
            file.load(),
            Err(StateFileError::Format { found: 2, .. })
        ));
        drop(file);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// An app's MSS clamp is saved and loaded back; a state without clamps is written as the
    /// release before them wrote it, and that release's files load (no clamp).
    #[test]
    fn mss_clamps_round_trip_and_files_without_them_load() {
        let file = TempFile::new("mss");
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        s.create_app("b", None, RANGE).unwrap();
        file.save(&s).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains("mss"), "no clamp, no field: {text}");
        s.set_mss_clamp("a", Some(1360)).unwrap();
        file.save(&s).unwrap();
        let loaded = file.load().unwrap();
        assert_eq!(loaded, s);
        assert_eq!(loaded.apps["a"].mss_clamp, Some(1360));
        assert_eq!(loaded.apps["b"].mss_clamp, None);

        // As the release before MSS clamps wrote it.
        let old = r#"{
  "format": 1,
  "apps": {
    "web": {
      "id": 1,
      "port": 20000,
      "backends": [
        {"id": 1, "addr": "198.51.100.2:80", "weight": 1, "state": "active", "since_ms": 5}
      ],
      "health": {"rise": 3}
    }
  },
  "next_backend_id": 2
}
"#;
        fs::write(file.path(), old).unwrap();
        let loaded = file.load().unwrap();
        let web = &loaded.apps["web"];
        assert_eq!(
            (web.id, web.port, web.mss_clamp, web.client_address),
            (1, 20000, None, ClientAddress::None)
        );
        assert_eq!(web.health.rise, Some(3));
        assert_eq!(web.backends[0].addr, addr("198.51.100.2:80"));
    }

    /// An app's rate limit (and its plan) is saved and loaded back; none, no field; a file
    /// without it loads (no limit).
    #[test]
    fn rate_limits_round_trip_and_files_without_them_load() {
        let file = TempFile::new("rl");
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        s.create_app("b", None, RANGE).unwrap();
        file.save(&s).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(
            !text.contains("rate_limit") && !text.contains("plan"),
            "no limit, no field: {text}"
        );
        let small = RateLimit::new(1000, Some(100)).unwrap();
        s.set_rate_limit("a", Some(small), Some("small".into()))
            .unwrap();
        s.set_rate_limit("b", Some(RateLimit::new(50, None).unwrap()), None)
            .unwrap();
        file.save(&s).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(
            text.contains(r#""pps": 1000"#) && text.contains(r#""plan": "small""#),
            "{text}"
        );
        let loaded = file.load().unwrap();
        assert_eq!(loaded, s);
        assert_eq!(loaded.apps["a"].rate_limit, Some(small));
        assert_eq!(loaded.apps["a"].plan.as_deref(), Some("small"));
        assert_eq!(
            loaded.apps["b"].rate_limit,
            Some(RateLimit { pps: 50, burst: 15 })
        );
        assert_eq!(loaded.apps["b"].plan, None);
        // Removed: no field again.
        s.set_rate_limit("a", None, None).unwrap();
        s.set_rate_limit("b", None, None).unwrap();
        file.save(&s).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(
            !text.contains("rate_limit") && !text.contains("plan"),
            "{text}"
        );
        assert_eq!(file.load().unwrap().apps["a"].rate_limit, None);

        // A limit this build refuses (hand-edited: 0 pps) is refused, the file kept.
        s.set_rate_limit("b", Some(RateLimit::new(50, None).unwrap()), None)
            .unwrap();
        file.save(&s).unwrap();
        let bad = fs::read_to_string(file.path())
            .unwrap()
            .replace(r#""pps": 50"#, r#""pps": 0"#);
        fs::write(file.path(), &bad).unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("rate limit must look like"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(file.path()).unwrap(), bad);
    }

    /// An app's client address is saved when it is `toa` and loaded back; files without it
    /// (those of the releases before it, and those of apps with `none`) load as `none`; a value
    /// this build does not know is refused, the file kept.
    #[test]
    fn client_addresses_round_trip_and_files_without_them_load() {
        let file = TempFile::new("toa");
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        s.create_app("b", None, RANGE).unwrap();
        s.set_mss_clamp("b", Some(1360)).unwrap();
        file.save(&s).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains("client_address"), "none, no field: {text}");
        s.set_client_address("a", ClientAddress::Toa).unwrap();
        file.save(&s).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert_eq!(
            text.matches(r#""client_address": "toa""#).count(),
            1,
            "{text}"
        );
        let loaded = file.load().unwrap();
        assert_eq!(loaded, s);
        assert_eq!(loaded.apps["a"].client_address, ClientAddress::Toa);
        assert_eq!(
            (loaded.apps["b"].client_address, loaded.apps["b"].mss_clamp),
            (ClientAddress::None, Some(1360))
        );

        let bad = text.replace(r#""client_address": "toa""#, r#""client_address": "proxy""#);
        fs::write(file.path(), &bad).unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("client address must be toa or none"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(file.path()).unwrap(), bad);
    }
}
