//! The JSON log line format (`--log-format json`).
//!
//! One object per line: `timestamp`, `level`, the event's fields (`message` among them),
//! `target`: the shape of tracing-subscriber's `json().flatten_event(true)`, written
//! straight into the line buffer. The stock formatter first collects the fields into a map
//! of JSON values, which made the audit line (one per token) about a tenth of a kept-alive
//! token's CPU; this one costs a fraction of that (BENCHMARKS.md).
//!
//! [`BufferedLines`]: where the lines go. Written one by one, each line was a `write`
//! system call of its own on every token's path.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use prometheus::IntCounter;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON line event format. Spans are not written (the broker has none).
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = JsonObject::default();
        line.field("timestamp");
        line.string(&jiff::Timestamp::now().to_string());
        line.field("level");
        line.string(metadata.level().as_str());
        event.record(&mut line);
        line.field("target");
        line.string(metadata.target());
        line.0.extend_from_slice(b"}\n");
        writer.write_str(std::str::from_utf8(&line.0).map_err(|_| fmt::Error)?)
    }
}

/// A JSON object being written: `{` and the members so far.
#[derive(Default)]
struct JsonObject(Vec<u8>);

impl JsonObject {
    fn field(&mut self, name: &str) {
        self.0.push(if self.0.is_empty() { b'{' } else { b',' });
        self.string(name);
        self.0.push(b':');
    }

    fn string(&mut self, value: &str) {
        // Serializing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.0, value);
    }

    fn raw(&mut self, value: impl fmt::Display) {
        use std::io::Write;
        let _ = write!(self.0, "{value}");
    }
}

impl Visit for JsonObject {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field.name());
        self.string(value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field.name());
        self.raw(value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field.name());
        self.raw(value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field.name());
        self.raw(value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field.name());
        if value.is_finite() {
            self.raw(value);
        } else {
            self.string(&value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field.name());
        self.string(&format!("{value:?}"));
    }
}

/// Log lines gathered so that many reach the sink with one `write`. A line at WARN or
/// above, and a line that fills the buffer, writes everything so far at once; the rest
/// are written by [`BufferedLines::spawn_flusher`]'s thread within [`FLUSH_INTERVAL`]
/// (nginx's `access_log ... buffer= flush=`), and by [`Logs::flush`] at exit.
/// Lines keep their order. A thread that sleeps between flushes costs no wakeup per line,
/// which is what made a writer thread fed line by line slower than writing in place.
#[derive(Clone)]
pub struct BufferedLines(Arc<Shared>);

struct Shared {
    /// Every line is written at once (short-lived commands: nothing to gain, and their
    /// own messages to stderr must not overtake their log lines).
    write_through: bool,
    /// Lines not written yet.
    pending: Mutex<Vec<u8>>,
    /// Held while writing, so batches reach the sink in order; keeps the spare buffer
    /// that is swapped with `pending`, so neither is reallocated.
    sink: Mutex<(Vec<u8>, Box<dyn Write + Send>)>,
}

/// The most a line waits in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Buffered bytes that make the writing line flush at once.
const BUFFER_BYTES: usize = 64 * 1024;

/// A poisoned log buffer is still a good log buffer: a panic elsewhere must not silence it.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BufferedLines {
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self::with(sink, false)
    }

    /// Lines written one by one, as an unbuffered stderr would.
    pub fn write_through(sink: Box<dyn Write + Send>) -> Self {
        Self::with(sink, true)
    }

    fn with(sink: Box<dyn Write + Send>, write_through: bool) -> Self {
        Self(Arc::new(Shared {
            write_through,
            pending: Mutex::new(Vec::with_capacity(BUFFER_BYTES)),
            sink: Mutex::new((Vec::with_capacity(BUFFER_BYTES), sink)),
        }))
    }

    /// Writes what is buffered every [`FLUSH_INTERVAL`], for the life of the process, then
    /// runs `after_flush` (outside any event: it may log).
    pub fn spawn_flusher(&self, after_flush: impl Fn() + Send + 'static) -> std::io::Result<()> {
        let lines = self.clone();
        std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || loop {
                std::thread::sleep(FLUSH_INTERVAL);
                lines.flush();
                after_flush();
            })
            .map(drop)
    }

    /// Adds whole lines (one event's) to the buffer; writes it at once when `urgent`, full
    /// or write-through.
    fn append(&self, bytes: &[u8], urgent: bool) {
        let full = {
            let mut pending = locked(&self.0.pending);
            pending.extend_from_slice(bytes);
            pending.len() >= BUFFER_BYTES
        };
        if full || urgent || self.0.write_through {
            self.flush();
        }
    }

    /// Writes what is buffered to the current sink, then sends what follows to `sink`.
    fn replace_sink(&self, sink: Box<dyn Write + Send>) {
        self.flush_holding().1 = sink;
    }

    /// Writes every buffered line. Write errors are dropped: there is nowhere to report
    /// them, and a closed stderr must not take the server down.
    pub fn flush(&self) {
        drop(self.flush_holding());
    }

    /// Flushes, and returns the sink still locked.
    fn flush_holding(&self) -> MutexGuard<'_, (Vec<u8>, Box<dyn Write + Send>)> {
        let mut sink = locked(&self.0.sink);
        let (batch, out) = &mut *sink;
        std::mem::swap(&mut *locked(&self.0.pending), batch);
        if !batch.is_empty() {
            let _ = out.write_all(batch).and_then(|()| out.flush());
            batch.clear();
        }
        sink
    }
}

/// One event's writer: appends, and flushes when the line is urgent or the buffer full.
pub struct LineWriter<'a> {
    lines: &'a BufferedLines,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.lines.append(bytes, self.urgent);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedLines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            lines: self,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            lines: self,
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

/// Where the lines go: stderr, except audit lines (target `audit`) while an audit file is
/// open. Routing happens per line, after formatting: both sinks get the same format.
#[derive(Clone)]
pub struct Logs {
    main: BufferedLines,
    audit: Arc<AuditLog>,
}

impl Logs {
    fn new(main: BufferedLines) -> Self {
        let audit = AuditLog {
            lines: BufferedLines::new(Box::new(ToMain(main.clone()))),
            main: main.clone(),
            path: Mutex::new(None),
            open: AtomicBool::new(false),
            failures: Arc::default(),
        };
        Self {
            main,
            audit: Arc::new(audit),
        }
    }

    /// The audit file, for the server to open, reopen and close.
    pub fn audit(&self) -> Arc<AuditLog> {
        self.audit.clone()
    }

    /// Writes every buffered line (audit lines first: they may still be on their way to
    /// the main buffer).
    pub fn flush(&self) {
        self.audit.lines.flush();
        self.audit.report_failure();
        self.main.flush();
    }

    /// A guard that flushes when dropped, also while a panic unwinds.
    pub fn flush_on_drop(&self) -> FlushOnDrop<'_> {
        FlushOnDrop(self)
    }
}

/// See [`Logs::flush_on_drop`].
pub struct FlushOnDrop<'a>(&'a Logs);

impl Drop for FlushOnDrop<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        self.main.make_writer()
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter<'a> {
        if meta.target() == "audit" && self.audit.open.load(Ordering::Acquire) {
            self.audit.lines.make_writer_for(meta)
        } else {
            self.main.make_writer_for(meta)
        }
    }
}

/// The audit file (`[audit] path`): appended to, created with mode 0640 when missing,
/// reopened on SIGHUP so that logrotate's rename is followed. Its lines are buffered like
/// the others and flushed to the file open when they were written (a line written between
/// a rename and the reopen lands in the renamed file), so none is lost or cut.
pub struct AuditLog {
    /// Writes to the file; with none open, to the main log (a line routed here just
    /// before a close still reaches a sink).
    lines: BufferedLines,
    main: BufferedLines,
    path: Mutex<Option<PathBuf>>,
    /// Whether audit lines are routed here.
    open: AtomicBool,
    failures: Arc<AuditFailures>,
}

/// Writes the audit file refused, for the metric and the error line.
#[derive(Default)]
struct AuditFailures {
    /// `audit_file_write_failures_total`, once the server has metrics.
    counter: OnceLock<IntCounter>,
    /// The first refusal of a run of them, not yet logged: the writer cannot log (it runs
    /// inside an event), so the flusher's thread does.
    unreported: Mutex<Option<(PathBuf, std::io::Error)>>,
}

/// The audit file as the sink of audit lines. A batch the file refuses (disk full, an I/O
/// error) goes to the main log instead, so no decision goes unrecorded, and is counted.
/// A line a full disk cut goes to the main log whole, and is taken back from the file; where
/// it cannot be (an append-only file), the file's next write first ends it.
struct AuditFile<F = std::fs::File> {
    file: F,
    path: PathBuf,
    main: BufferedLines,
    failures: Arc<AuditFailures>,
    /// The last write failed: only the first failure of a run is logged.
    failing: bool,
    /// The file ends in a cut line that could not be taken back.
    mid_line: bool,
}

/// What [`AuditFile`] needs of its file: appending, and taking back the end of what it
/// appended.
trait AppendOnly: Write {
    fn take_back(&mut self, bytes: u64) -> std::io::Result<()>;
}

impl AppendOnly for std::fs::File {
    fn take_back(&mut self, bytes: u64) -> std::io::Result<()> {
        let length = self.metadata()?.len();
        self.set_len(length.saturating_sub(bytes))
    }
}

/// Writes as much of `bytes` as `file` takes: how much, and why not all.
fn append(file: &mut impl Write, bytes: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut written = 0;
    while written < bytes.len() {
        match file.write(&bytes[written..]) {
            Ok(0) => return (written, Some(std::io::ErrorKind::WriteZero.into())),
            Ok(count) => written += count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return (written, Some(error)),
        }
    }
    (written, None)
}

impl<F: AppendOnly> Write for AuditFile<F> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let (written, refused) = match self.mid_line {
            true => match append(&mut self.file, b"\n") {
                (_, Some(error)) => (0, Some(error)),
                (_, None) => {
                    self.mid_line = false;
                    append(&mut self.file, bytes)
                }
            },
            false => append(&mut self.file, bytes),
        };
        let Some(error) = refused else {
            self.failing = false;
            return Ok(bytes.len());
        };
        let whole = bytes[..written]
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |newline| newline + 1);
        let cut = (written - whole) as u64;
        if cut > 0 && self.file.take_back(cut).is_err() {
            self.mid_line = true;
        }
        self.main.append(&bytes[whole..], false);
        if let Some(counter) = self.failures.counter.get() {
            counter.inc();
        }
        if !std::mem::replace(&mut self.failing, true) {
            *locked(&self.failures.unreported) = Some((self.path.clone(), error));
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The audit file cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log {}: {source}", path.display())]
pub struct AuditOpenError {
    path: PathBuf,
    source: std::io::Error,
}

impl AuditLog {
    /// Sends audit lines to the file at `path` from now on (opened again if it is the
    /// same path: a reopen), or, with `None`, back to the main log. On an error nothing
    /// changes: the lines keep going where they went.
    pub fn open_at(&self, path: Option<&Path>) -> Result<(), AuditOpenError> {
        match path {
            Some(path) => {
                let file = open_append(path).map_err(|source| AuditOpenError {
                    path: path.to_owned(),
                    source,
                })?;
                self.lines.replace_sink(Box::new(AuditFile {
                    file,
                    path: path.to_owned(),
                    main: self.main.clone(),
                    failures: self.failures.clone(),
                    failing: false,
                    mid_line: false,
                }));
                *locked(&self.path) = Some(path.to_owned());
                self.open.store(true, Ordering::Release);
            }
            None => {
                self.open.store(false, Ordering::Release);
                self.lines.replace_sink(Box::new(ToMain(self.main.clone())));
                *locked(&self.path) = None;
            }
        }
        Ok(())
    }

    /// The file audit lines go to now, if any.
    pub fn path(&self) -> Option<PathBuf> {
        locked(&self.path).clone()
    }

    /// Counts the audit file's refused writes in `counter` from now on (the server's
    /// `audit_file_write_failures_total`; the first call wins).
    pub fn count_failures_in(&self, counter: IntCounter) {
        let _ = self.failures.counter.set(counter);
    }

    /// Logs the audit file's first refused write since it last accepted one, if not yet
    /// logged.
    fn report_failure(&self) {
        let unreported = locked(&self.failures.unreported).take();
        if let Some((path, error)) = unreported {
            tracing::error!(
                path = %path.display(),
                %error,
                "the audit file refuses writes; audit lines go to the main log until it takes them again (metric audit_file_write_failures_total)"
            );
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o640);
    }
    options.open(path)
}

/// A sink that hands whole batches of lines to the main log's buffer.
struct ToMain(BufferedLines);

impl Write for ToMain {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.append(bytes, false);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Logs go to stderr, through a buffer for the long-running commands (an audit line per
/// token); the caller flushes them before exiting.
pub fn init(format: LogFormat, buffered: bool) -> Logs {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKEN_BROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr = Box::new(std::io::stderr());
    let logs = if buffered {
        let logs = Logs::new(BufferedLines::new(stderr));
        let audit = logs.audit();
        for started in [
            logs.main.spawn_flusher(|| ()),
            logs.audit
                .lines
                .spawn_flusher(move || audit.report_failure()),
        ] {
            if let Err(error) = started {
                eprintln!("warning: no log flushing thread ({error}); info lines wait for a warning, a full buffer or the exit");
            }
        }
        logs
    } else {
        Logs::new(BufferedLines::write_through(stderr))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logs.clone())
        // Plain text: the same bytes on a terminal, in a file and in a log collector.
        .with_ansi(false)
        // A closed stderr must not take the server down (the default reports write
        // failures with eprintln!, which panics on a closed stderr).
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.event_format(JsonLines).init(),
        LogFormat::Text => builder.init(),
    }
    logs
}

#[cfg(test)]
mod tests {
    use super::{
        locked, AppendOnly, AuditFailures, AuditFile, BufferedLines, JsonLines, BUFFER_BYTES,
        FLUSH_INTERVAL,
    };
    use prometheus::IntCounter;
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_json_objects_shaped_like_tracing_subscribers() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let peer: std::net::SocketAddr = "127.0.0.2:4711".parse().unwrap();
            tracing::info!(
                target: "audit",
                %peer,
                rule = Some("devices"),
                reason = None::<&str>,
                count = 3u64,
                delta = -2i64,
                ratio = 0.5,
                ok = true,
                weird = "quote \" backslash \\ newline \n tab \t nul \u{0}",
                "token decision"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "audit");
        assert_eq!(line["message"], "token decision");
        assert_eq!(line["peer"], "127.0.0.2:4711");
        assert_eq!(line["rule"], "devices");
        assert!(line.get("reason").is_none(), "None fields are left out");
        assert_eq!(line["count"], 3);
        assert_eq!(line["delta"], -2);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["ok"], true);
        assert_eq!(
            line["weird"],
            "quote \" backslash \\ newline \n tab \t nul \u{0}"
        );
        let timestamp = line["timestamp"].as_str().unwrap();
        assert!(timestamp.parse::<jiff::Timestamp>().is_ok(), "{timestamp}");
    }

    fn buffered() -> (Buffer, BufferedLines) {
        let sink = Buffer::default();
        (sink.clone(), BufferedLines::new(Box::new(sink)))
    }

    fn written(sink: &Buffer) -> String {
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn info_lines_wait_a_warning_writes_everything_in_order() {
        let (sink, lines) = buffered();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("one");
            tracing::info!("two");
            assert_eq!(written(&sink), "", "info lines are buffered");
            tracing::warn!("three");
        });
        let messages: Vec<String> = written(&sink)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["message"].to_string())
            .collect();
        assert_eq!(messages, ["\"one\"", "\"two\"", "\"three\""]);
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .with_writer(lines.clone())
                .finish(),
            || tracing::info!("four"),
        );
        lines.flush();
        assert!(written(&sink).ends_with("four\n"), "{}", written(&sink));
    }

    /// Audit lines follow the audit file as it is opened, renamed and reopened, and
    /// closed; every other line, and audit lines without a file, go to the main sink.
    #[test]
    fn audit_lines_follow_the_audit_file_and_none_is_lost() {
        let (main, lines) = buffered();
        let logs = super::Logs::new(lines);
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(logs.clone())
            .finish();
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = (dir.path().join("audit.log"), dir.path().join("audit.log.1"));
        let audit = logs.audit();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "audit", "zero");
            audit.open_at(Some(&path)).unwrap();
            tracing::info!(target: "audit", "one");
            tracing::info!("other");
            std::fs::rename(&path, &rotated).unwrap();
            tracing::info!(target: "audit", "two");
            audit.open_at(Some(&path)).unwrap();
            tracing::info!(target: "audit", "three");
            audit.open_at(None).unwrap();
            tracing::info!(target: "audit", "four");
        });
        logs.flush();
        let messages = |text: &str| -> Vec<String> {
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .map(|l| l["message"].as_str().unwrap().to_owned())
                .collect()
        };
        let file = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(messages(&file(&rotated)), ["one", "two"]);
        assert_eq!(messages(&file(&path)), ["three"]);
        assert_eq!(messages(&written(&main)), ["zero", "other", "four"]);
        assert_eq!(audit.path(), None);
        let missing = dir.path().join("no-such-folder/audit.log");
        let error = audit.open_at(Some(&missing)).unwrap_err().to_string();
        assert!(error.contains("no-such-folder"), "{error}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o137, 0, "{mode:o}");
        }
    }

    /// A disk with `room` bytes left: a write gets what fits, then "no space left".
    #[derive(Default)]
    struct Disk {
        data: Vec<u8>,
        room: usize,
        /// `chattr +a`: what was written stays.
        append_only: bool,
    }

    impl Write for Disk {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let count = bytes.len().min(self.room);
            if count == 0 && !bytes.is_empty() {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            self.data.extend_from_slice(&bytes[..count]);
            self.room -= count;
            Ok(count)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl AppendOnly for Disk {
        fn take_back(&mut self, bytes: u64) -> std::io::Result<()> {
            if self.append_only {
                return Err(std::io::ErrorKind::PermissionDenied.into());
            }
            let bytes = bytes as usize;
            self.data.truncate(self.data.len() - bytes);
            self.room += bytes;
            Ok(())
        }
    }

    /// A full disk cuts a batch mid-line: the file keeps the whole lines before the cut, the
    /// main log gets the rest whole, once; the failure is counted and reported once per run
    /// of failures; with room again, the file takes lines where it stopped.
    #[test]
    fn an_audit_file_on_a_full_disk_keeps_whole_lines_and_the_main_log_gets_the_rest() {
        let (main_sink, main) = buffered();
        let failures = Arc::new(AuditFailures::default());
        let counter = IntCounter::new("failures", "test").unwrap();
        failures.counter.set(counter.clone()).unwrap();
        let mut file = AuditFile {
            file: Disk {
                data: Vec::new(),
                room: 6,
                append_only: false,
            },
            path: PathBuf::from("audit.log"),
            main: main.clone(),
            failures: failures.clone(),
            failing: false,
            mid_line: false,
        };
        file.write_all(b"one\ntwo\nthree\n").unwrap();
        assert_eq!(file.file.data, b"one\n", "the cut \"two\" taken back");
        file.write_all(b"four\n").unwrap();
        main.flush();
        assert_eq!(written(&main_sink), "two\nthree\nfour\n");
        assert_eq!(counter.get(), 2);
        let (path, error) = locked(&failures.unreported).take().unwrap();
        assert_eq!(path, PathBuf::from("audit.log"));
        assert_eq!(error.kind(), std::io::ErrorKind::StorageFull);

        file.file.room = 100;
        file.write_all(b"five\n").unwrap();
        assert_eq!(file.file.data, b"one\nfive\n");
        file.file.room = 0;
        file.write_all(b"six\n").unwrap();
        assert!(
            locked(&failures.unreported).is_some(),
            "a new run of failures is reported again"
        );
        assert_eq!(counter.get(), 3);

        // An append-only file keeps the cut line: the main log still gets it whole, and
        // the file's next write ends it first.
        file.file = Disk {
            data: Vec::new(),
            room: 3,
            append_only: true,
        };
        file.write_all(b"seven\n").unwrap();
        file.file.room = 100;
        file.write_all(b"eight\n").unwrap();
        assert_eq!(file.file.data, b"sev\neight\n");
        main.flush();
        assert!(written(&main_sink).ends_with("six\nseven\n"));
    }

    #[test]
    fn write_through_lines_are_written_at_once() {
        let sink = Buffer::default();
        let lines = BufferedLines::write_through(Box::new(sink.clone()));
        tracing::subscriber::with_default(
            tracing_subscriber::fmt().with_writer(lines).finish(),
            || tracing::info!("now"),
        );
        assert!(written(&sink).ends_with("now\n"), "{}", written(&sink));
    }

    #[test]
    fn a_full_buffer_is_written_at_once_and_the_flusher_writes_the_rest() {
        let (sink, lines) = buffered();
        let mut writer = tracing_subscriber::fmt::MakeWriter::make_writer(&lines);
        let line = vec![b'x'; 1000];
        let mut sent = 0;
        while sent < BUFFER_BYTES {
            std::io::Write::write_all(&mut writer, &line).unwrap();
            sent += line.len();
        }
        assert_eq!(
            written(&sink).len(),
            sent,
            "the line that filled it flushed"
        );
        std::io::Write::write_all(&mut writer, b"tail").unwrap();
        assert_eq!(written(&sink).len(), sent);
        lines.spawn_flusher(|| ()).unwrap();
        // Generous: only a flusher that never writes may run out of it, not a busy machine.
        let deadline = std::time::Instant::now() + 600 * FLUSH_INTERVAL;
        while !written(&sink).ends_with("tail") {
            assert!(
                std::time::Instant::now() < deadline,
                "the flusher never wrote"
            );
            std::thread::sleep(FLUSH_INTERVAL / 4);
        }
    }
}
