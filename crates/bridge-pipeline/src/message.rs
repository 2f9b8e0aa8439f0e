//! Inbound messages, CloudEvents headers and trace context.

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{BorrowedMessage, Message};
use uuid::Uuid;

use bridge_store::outbox::OutboxMessage;

/// An owned copy of a consumed message, so processing does not hold a
/// reference into the consumer across awaits.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp in milliseconds, when the broker gave one.
    pub timestamp_ms: Option<i64>,
}

impl Inbound {
    pub fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
        let headers = read_headers(message);
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// A name for this exact record, used to deduplicate dead-lettering of
    /// one message. The timestamp tells apart two records at the same
    /// position of a topic that was deleted and created again.
    pub fn position_id(&self) -> String {
        format!("{}/{}/{}@{}", self.topic, self.partition, self.offset, self.timestamp_ms.unwrap_or(-1))
    }
}

/// Reads every header of `message` without trusting its bytes.
///
/// rdkafka's safe `Headers::iter` unwraps the UTF-8 conversion of each header
/// name, so a single message with a non-UTF-8 header name would panic the
/// stage on every redelivery and stall its partition for good. We read the
/// headers through librdkafka's C API instead and convert names lossily; the
/// values stay raw bytes.
fn read_headers(message: &BorrowedMessage<'_>) -> Vec<(String, Vec<u8>)> {
    use rdkafka::bindings as rd;
    let mut headers = Vec::new();
    // SAFETY: `message.ptr()` is a valid message for the lifetime of the
    // borrow; librdkafka owns the header list and the name and value buffers
    // it hands out, which stay valid while the message lives, and we copy
    // them before returning. A null name or value pointer is checked.
    unsafe {
        let mut list: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(message.ptr(), &mut list) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || list.is_null()
        {
            return headers;
        }
        let mut index = 0;
        loop {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size: usize = 0;
            if rd::rd_kafka_header_get_all(list, index, &mut name, &mut value, &mut size)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                break;
            }
            let name = if name.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
            };
            let value = if value.is_null() || size == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(value as *const u8, size).to_vec()
            };
            headers.push((name, value));
            index += 1;
        }
    }
    headers
}

/// W3C trace context. We continue the caller's trace when the message
/// carries a valid `traceparent`, and start one otherwise, so every hop of a
/// transfer shares one trace id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    /// The exported span events are written under, when traces are on.
    pub span_id: Option<String>,
    /// Whether the trace is sampled, as the caller decided: passed on to
    /// the next hop, never forced.
    pub sampled: bool,
}

impl TraceContext {
    /// The trace to write events in. With traces exported, the current
    /// span (a message's, whose parent is this same `traceparent`) is the
    /// parent of what it writes, so the next hop's span hangs under it.
    /// Otherwise the trace id of `traceparent`, or a new trace.
    pub fn continue_or_start(traceparent: Option<&str>) -> Self {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let current = tracing::Span::current().context();
        let exported = current.span().span_context().clone();
        if exported.is_valid() {
            return Self {
                trace_id: exported.trace_id().to_string(),
                span_id: Some(exported.span_id().to_string()),
                sampled: exported.is_sampled(),
            };
        }
        match traceparent.and_then(parse_traceparent) {
            Some(parent) => Self { trace_id: parent.trace_id, span_id: None, sampled: parent.sampled },
            // A trace of our own is sampled; the collector may still drop it.
            None => Self { trace_id: Uuid::new_v4().simple().to_string(), span_id: None, sampled: true },
        }
    }

    /// A `traceparent` for the next hop of this trace: under the current
    /// exported span, or under a new span id when nothing is exported.
    pub fn child_traceparent(&self) -> String {
        let span = match &self.span_id {
            Some(span_id) => span_id.clone(),
            None => Uuid::new_v4().simple().to_string()[..16].to_owned(),
        };
        let flags = if self.sampled { "01" } else { "00" };
        format!("00-{}-{span}-{flags}", self.trace_id)
    }
}

/// A W3C `traceparent`, lower-case.
struct Traceparent {
    trace_id: String,
    span_id: String,
    sampled: bool,
}

/// A W3C `traceparent`; `None` if it is not a valid version-00 value.
fn parse_traceparent(value: &str) -> Option<Traceparent> {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |text: &str, len: usize| text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1] != "00000000000000000000000000000000"
        && hex(parts[2], 16)
        && parts[2] != "0000000000000000"
        && hex(parts[3], 2);
    let flags = u8::from_str_radix(parts.get(3)?, 16).ok()?;
    valid.then(|| Traceparent {
        trace_id: parts[1].to_ascii_lowercase(),
        span_id: parts[2].to_ascii_lowercase(),
        sampled: flags & 1 == 1,
    })
}

/// The OpenTelemetry context of a remote parent named by `traceparent`.
pub fn remote_parent(traceparent: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    let parent = parse_traceparent(traceparent)?;
    let flags = if parent.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let context = SpanContext::new(
        TraceId::from_hex(&parent.trace_id).ok()?,
        SpanId::from_hex(&parent.span_id).ok()?,
        flags,
        true,
        TraceState::default(),
    );
    Some(opentelemetry::Context::new().with_remote_span_context(context))
}

/// Builds an outbox message with CloudEvents binary-mode headers.
pub struct Envelope<'a> {
    pub event_id: Uuid,
    pub ce_type: &'a str,
    pub source: &'a str,
    pub subject: &'a str,
    pub time: DateTime<Utc>,
    pub trace: &'a TraceContext,
}

impl Envelope<'_> {
    pub fn into_outbox(self, topic: String, key: &str, payload: Vec<u8>) -> OutboxMessage {
        let headers = vec![
            ("ce_specversion".to_owned(), b"1.0".to_vec()),
            ("ce_id".to_owned(), self.event_id.to_string().into_bytes()),
            ("ce_type".to_owned(), self.ce_type.as_bytes().to_vec()),
            ("ce_source".to_owned(), self.source.as_bytes().to_vec()),
            ("ce_subject".to_owned(), self.subject.as_bytes().to_vec()),
            ("ce_time".to_owned(), self.time.to_rfc3339_opts(SecondsFormat::Millis, true).into_bytes()),
            ("content-type".to_owned(), bridge_codec::CONTENT_TYPE.as_bytes().to_vec()),
            ("traceparent".to_owned(), self.trace.child_traceparent().into_bytes()),
        ];
        OutboxMessage { event_id: self.event_id, topic, key: Some(key.as_bytes().to_vec()), payload, headers }
    }
}

/// Dead-letter record headers, added to the original message's headers.
pub mod dead_letter_headers {
    pub const ORIGINAL_TOPIC: &str = "bridge_dlq_original_topic";
    pub const ORIGINAL_PARTITION: &str = "bridge_dlq_original_partition";
    pub const ORIGINAL_OFFSET: &str = "bridge_dlq_original_offset";
    pub const ERROR_CLASS: &str = "bridge_dlq_error_class";
    pub const ERROR_MESSAGE: &str = "bridge_dlq_error_message";
    pub const STAGE: &str = "bridge_dlq_stage";
    pub const FAILED_AT: &str = "bridge_dlq_failed_at";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_is_continued_only_from_a_valid_traceparent() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = TraceContext::continue_or_start(Some(parent));
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = trace.child_traceparent();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_eq!(child.len(), parent.len());
        assert!(child.ends_with("-01"));
        // The caller's decision not to sample is passed on, not overruled.
        let unsampled =
            TraceContext::continue_or_start(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
        assert!(!unsampled.sampled && unsampled.child_traceparent().ends_with("-00"));
        assert!(remote_parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").is_some());
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "",
        ] {
            assert_ne!(TraceContext::continue_or_start(Some(bad)).trace_id, "00000000000000000000000000000000");
            assert_eq!(TraceContext::continue_or_start(Some(bad)).trace_id.len(), 32);
        }
    }
}
