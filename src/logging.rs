//! The JSON log line format (`--log-format json`).
//!
//! One object per line: `timestamp`, `level`, the event's fields (`message` among them),
//! `target`: the shape of tracing-subscriber's `json().flatten_event(true)`, written
//! straight into the line buffer. The stock formatter first collects the fields into a map
//! of JSON values, which made the audit line (one per token) about a tenth of a kept-alive
//! token's CPU; this one costs a fraction of that (BENCHMARKS.md).

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::JsonLines;
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
}
