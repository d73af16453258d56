//! `token-broker` as a separate process, as deployed: its log, signals, a clean exit.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A `token-broker` process with its stderr in a file; killed when dropped.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Process {
    pub fn start(args: &[&str], log: PathBuf) -> Process {
        let mut command = Command::new(super::binary());
        command.args(args);
        Process::spawn(command, log)
    }

    /// `command` (the binary with its arguments and environment) with its stderr in `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> Process {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        Process { child, log }
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Kills it and waits for the exit (also done when dropped).
    /// The process id, to read the process's own figures in /proc.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first line of the log containing `needle`, once it is there.
    pub async fn line(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + super::PATIENCE;
        loop {
            let log = self.log();
            // Whole lines only: the last one may still be being written.
            let written = log.rfind('\n').map_or("", |end| &log[..end]);
            if let Some(line) = written.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            let exited = self.exited();
            assert!(
                exited.is_none() && std::time::Instant::now() < deadline,
                "no {needle:?} in the log ({exited:?}):\n{log}"
            );
            tokio::time::sleep(super::POLL).await;
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit, blocking (call it from `spawn_blocking`).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// SIGTERM, then the exit (which flushes the logs), which must succeed; the whole log.
    pub async fn stop(mut self) -> String {
        self.signal("TERM");
        let deadline = std::time::Instant::now() + super::PATIENCE;
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "did not exit");
            tokio::time::sleep(super::POLL).await;
        };
        let log = self.log();
        assert!(status.success(), "{status}:\n{log}");
        log
    }
}
