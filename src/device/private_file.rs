//! A file only its owner may read or write, written whole: the token cache (`token
//! --cache`) holds credentials, so a file planted or left readable by someone else is never
//! trusted and never written through.

use std::path::{Path, PathBuf};

pub struct PrivateFile {
    path: PathBuf,
}

impl PrivateFile {
    pub fn new(path: &Path) -> PrivateFile {
        PrivateFile {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's bytes (`None` when there is none), refused unless it is a regular file
    /// of this user that no one else may read or write: its token is handed to whoever runs
    /// the command, so a planted file would choose the device's credentials.
    pub fn read_trusted(&self) -> Result<Option<Vec<u8>>, String> {
        let before = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        if !before.file_type().is_file() {
            return Err("not a regular file (a symbolic link?)".into());
        }
        let mut file = std::fs::File::open(&self.path).map_err(|e| e.to_string())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = file.metadata().map_err(|e| e.to_string())?;
            // The file opened is the one inspected, not one swapped in since.
            if (meta.dev(), meta.ino()) != (before.dev(), before.ino()) {
                return Err("replaced while being opened".into());
            }
            if meta.mode() & 0o077 != 0 {
                return Err(format!(
                    "mode {:03o} lets other users read or change it (the broker writes 600)",
                    meta.mode() & 0o777
                ));
            }
            let uid = self.current_uid().map_err(|e| e.to_string())?;
            if meta.uid() != uid {
                return Err(format!(
                    "owned by uid {}, not by this user ({uid})",
                    meta.uid()
                ));
            }
        }
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut text).map_err(|e| e.to_string())?;
        Ok(Some(text))
    }

    /// This process's user, as the owner of a file it creates (std has no getuid).
    #[cfg(unix)]
    pub(crate) fn current_uid(&self) -> std::io::Result<u32> {
        use std::os::unix::fs::MetadataExt;
        let (probe, file) = self.create_temporary()?;
        let uid = file.metadata().map(|meta| meta.uid());
        let _ = std::fs::remove_file(&probe);
        uid
    }

    /// A new file beside this one, under a fresh random name, readable by the owner only:
    /// `create_new` never opens what someone planted there (file or symbolic link).
    fn create_temporary(&self) -> std::io::Result<(PathBuf, std::fs::File)> {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = self
            .path
            .with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&temporary)?;
        Ok((temporary, file))
    }

    /// Writes atomically (a new temporary file, then rename), readable by the owner only.
    pub fn store(&self, contents: &[u8]) -> Result<(), String> {
        let io = |e: std::io::Error| format!("cannot write {}: {e}", self.path.display());
        let (temporary, mut file) = self.create_temporary().map_err(io)?;
        let written = std::io::Write::write_all(&mut file, contents)
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.map_err(io)
    }
}
