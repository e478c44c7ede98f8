//! `websocket_chat_status`: the instance's numbers (see `metrics`) as JSON,
//! or in Prometheus's text format.

use std::fmt::Write;

use ngx::ffi::{
    ngx_http_arg, ngx_http_request_t, ngx_int_t, ngx_str_t, NGX_DECLINED, NGX_HTTP_GET,
    NGX_HTTP_HEAD, NGX_OK,
};
use ngx::http::Request;

use crate::metrics::{self, CloseKind, Counter, Gauge, PublishStatus, Refusal, Totals};
use crate::response;

pub extern "C" fn websocket_chat_status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a live request.
    let req = unsafe { &mut *r };
    if req.method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
        return response::send(
            r,
            405,
            "application/json",
            br#"{"error":"method_not_allowed","message":"use GET or HEAD"}"#,
            &[("Allow", "GET, HEAD")],
        );
    }
    if req.main != r {
        return NGX_DECLINED as ngx_int_t;
    }
    let totals = metrics::totals();
    if wants_prometheus(req) {
        let body = prometheus(&totals);
        response::send(
            r,
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            body.as_bytes(),
            &[],
        )
    } else {
        let body = json(&totals);
        response::send(r, 200, "application/json", body.as_bytes(), &[])
    }
}

/// `?format=prometheus`, or a scraper's `Accept: text/plain` (`?format=json`
/// wins over the header).
fn wants_prometheus(req: &mut ngx_http_request_t) -> bool {
    let mut value = ngx_str_t::default();
    let name = b"format";
    // SAFETY: the request is live; nginx points `value` into its arguments.
    let rc = unsafe { ngx_http_arg(req, name.as_ptr().cast_mut(), name.len(), &mut value) };
    if rc == NGX_OK as isize {
        return value.as_bytes() == b"prometheus";
    }
    // SAFETY: the request is live; Request is a transparent wrapper.
    let request = unsafe { Request::from_ngx_http_request(req) };
    request.headers_in_iterator().any(|(k, v)| {
        k.as_bytes().eq_ignore_ascii_case(b"accept")
            && v.as_bytes()
                .windows(b"text/plain".len())
                .any(|w| w.eq_ignore_ascii_case(b"text/plain"))
    })
}

fn json(t: &Totals) -> String {
    let mut out = String::with_capacity(2048);
    let _ = write!(
        out,
        concat!(
            r#"{{"workers":{},"connections":{},"rooms":{},"sessions_opened":{},"#,
            r#""messages_received":{},"messages_sent":{},"bytes_received":{},"bytes_sent":{},"#,
            r#""closes":["#
        ),
        t.workers,
        t.gauge(Gauge::Connections),
        t.gauge(Gauge::Rooms),
        t.counter(Counter::SessionsOpened),
        t.counter(Counter::MessagesReceived),
        t.counter(Counter::MessagesSent),
        t.counter(Counter::BytesReceived),
        t.counter(Counter::BytesSent),
    );
    for (i, kind) in CloseKind::ALL.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            out,
            r#"{sep}{{"code":{},"reason":"{}","total":{}}}"#,
            kind.code(),
            kind.label(),
            t.counter(Counter::Close(*kind))
        );
    }
    out.push_str(r#"],"handshake_refusals":{"#);
    for (i, r) in Refusal::ALL.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            out,
            r#"{sep}"{}":{}"#,
            r.status(),
            t.counter(Counter::Refusal(*r))
        );
    }
    out.push_str(r#"},"publish_requests":{"#);
    for (i, p) in PublishStatus::ALL.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            out,
            r#"{sep}"{}":{}"#,
            p.status(),
            t.counter(Counter::Publish(*p))
        );
    }
    let _ = write!(
        out,
        concat!(
            r#"}},"history_fetches":{},"history_cached":{},"redis":{{"connections_up":{},"#,
            r#""connections_down":{},"reconnects":{},"backlog_bytes":{}}}}}"#,
            "\n"
        ),
        t.counter(Counter::HistoryFetches),
        t.counter(Counter::HistoryCached),
        t.gauge(Gauge::RedisUp),
        t.gauge(Gauge::RedisDown),
        t.counter(Counter::RedisReconnects),
        t.gauge(Gauge::BacklogBytes),
    );
    out
}

/// One metric family: its HELP and TYPE lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn one(value: u64) -> [(String, u64); 1] {
    [(String::new(), value)]
}

fn prometheus(t: &Totals) -> String {
    let mut out = String::with_capacity(4096);
    let simple: [(&str, &str, &str, u64); 12] = [
        (
            "websocket_chat_workers",
            "gauge",
            "Worker processes reporting.",
            t.workers,
        ),
        (
            "websocket_chat_connections",
            "gauge",
            "Chat sessions open now.",
            t.gauge(Gauge::Connections),
        ),
        (
            "websocket_chat_rooms",
            "gauge",
            "Rooms with members, counted once per worker that has members in them.",
            t.gauge(Gauge::Rooms),
        ),
        (
            "websocket_chat_sessions_opened_total",
            "counter",
            "Chat sessions opened.",
            t.counter(Counter::SessionsOpened),
        ),
        (
            "websocket_chat_messages_received_total",
            "counter",
            "Chat messages received from clients.",
            t.counter(Counter::MessagesReceived),
        ),
        (
            "websocket_chat_messages_sent_total",
            "counter",
            "Chat messages delivered live, one per recipient.",
            t.counter(Counter::MessagesSent),
        ),
        (
            "websocket_chat_received_bytes_total",
            "counter",
            "WebSocket bytes read from clients.",
            t.counter(Counter::BytesReceived),
        ),
        (
            "websocket_chat_sent_bytes_total",
            "counter",
            "Bytes written to clients after the 101.",
            t.counter(Counter::BytesSent),
        ),
        (
            "websocket_chat_history_fetches_total",
            "counter",
            "History and member fetches sent to Redis.",
            t.counter(Counter::HistoryFetches),
        ),
        (
            "websocket_chat_history_cached_total",
            "counter",
            "Joins whose history came from the worker's copy, without a fetch.",
            t.counter(Counter::HistoryCached),
        ),
        (
            "websocket_chat_redis_reconnects_total",
            "counter",
            "Redis connections established again after a loss.",
            t.counter(Counter::RedisReconnects),
        ),
        (
            "websocket_chat_redis_backlog_bytes",
            "gauge",
            "Bytes waiting to be sent to Redis.",
            t.gauge(Gauge::BacklogBytes),
        ),
    ];
    for (name, kind, help, value) in simple {
        family(&mut out, name, kind, help, &one(value));
    }
    let closes: Vec<(String, u64)> = (CloseKind::ALL.iter())
        .map(|k| {
            let code = match k.code() {
                0 => "other".to_owned(),
                n => n.to_string(),
            };
            (
                format!("{{code=\"{code}\",reason=\"{}\"}}", k.label()),
                t.counter(Counter::Close(*k)),
            )
        })
        .collect();
    family(
        &mut out,
        "websocket_chat_closes_total",
        "counter",
        "Chat sessions ended, by close code and reason.",
        &closes,
    );
    let refusals: Vec<(String, u64)> = (Refusal::ALL.iter())
        .map(|r| {
            (
                format!("{{status=\"{}\"}}", r.status()),
                t.counter(Counter::Refusal(*r)),
            )
        })
        .collect();
    family(
        &mut out,
        "websocket_chat_handshake_refusals_total",
        "counter",
        "Handshakes answered with an error, by status.",
        &refusals,
    );
    let publishes: Vec<(String, u64)> = (PublishStatus::ALL.iter())
        .map(|p| {
            (
                format!("{{status=\"{}\"}}", p.status()),
                t.counter(Counter::Publish(*p)),
            )
        })
        .collect();
    family(
        &mut out,
        "websocket_chat_publish_requests_total",
        "counter",
        "Publish requests answered, by status.",
        &publishes,
    );
    family(
        &mut out,
        "websocket_chat_redis_connections",
        "gauge",
        "Connections to Redis, by state.",
        &[
            ("{state=\"up\"}".to_owned(), t.gauge(Gauge::RedisUp)),
            ("{state=\"down\"}".to_owned(), t.gauge(Gauge::RedisDown)),
        ],
    );
    out
}
