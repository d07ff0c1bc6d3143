//! Just enough HTTP/1.1 to pipeline ordered deliveries on one connection.
//!
//! hyper's client sends one request per connection at a time, so delivering entries one by
//! one costs a loopback round trip each and caps a node at a few thousand applied entries
//! per second. HTTP/1.1 lets a client write many requests before reading the answers, which
//! the server must process and answer in order (RFC 9112 §9.3.2): exactly the ordering
//! Haven needs. This module encodes requests and frames responses (`Content-Length`,
//! chunked, or close-delimited bodies); the connection handling is in
//! [`super::pipeline`].

use bytes::Buf;
use bytes::Bytes;
use bytes::BytesMut;
use http::HeaderMap;
use http::HeaderName;
use http::HeaderValue;

use super::MAX_APP_RESPONSE_BYTES;
use super::Stamp;
use super::end_to_end_headers;
use haven_contract::AppResponse;
use haven_contract::OrderedRequest;
use haven_contract::headers::is_delivery_header;

/// Most response headers Haven accepts from the app in one response.
const MAX_RESPONSE_HEADERS: usize = 128;

/// Appends one request to `out`. Fails only for a request that can never be sent
/// (a header that is not valid HTTP); that is deterministic, so every replica fails alike.
pub fn encode_request(
    out: &mut Vec<u8>,
    host: &str,
    req: &OrderedRequest,
    stamp: &Stamp,
) -> Result<(), String> {
    if !is_token(req.method.as_bytes()) {
        return Err(format!("invalid method {:?}", req.method));
    }
    if req.uri.is_empty() || req.uri.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("invalid request target {:?}", req.uri));
    }
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.uri.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in req
        .headers
        .iter()
        .filter(|(name, _)| !is_delivery_header(name))
    {
        if name == "host" {
            continue;
        }
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header {name:?}"))?;
        HeaderValue::from_bytes(value).map_err(|_| format!("invalid value of header {name}"))?;
        push_header(out, name.as_bytes(), value);
    }
    push_header(
        out,
        haven_contract::headers::INDEX.as_bytes(),
        stamp.index.to_string().as_bytes(),
    );
    push_header(
        out,
        haven_contract::headers::TIME.as_bytes(),
        stamp.time_rfc3339.as_bytes(),
    );
    push_header(
        out,
        haven_contract::headers::SEED.as_bytes(),
        stamp.seed.to_string().as_bytes(),
    );
    push_header(
        out,
        b"content-length",
        req.body.len().to_string().as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&req.body);
    Ok(())
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// RFC 9110 `token`: what a method must be.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// One framed response and whether the app will close the connection after it (then any
/// request pipelined behind it was not processed and must be sent again).
#[derive(Debug)]
pub struct Parsed {
    pub response: AppResponse,
    pub closes: bool,
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// The head of a response: status, end-to-end headers, framing.
struct Head {
    status: u16,
    headers: HeaderMap,
    framing: Framing,
    closes: bool,
}

/// Takes one complete response off the front of `buf`. `None` means more bytes are needed;
/// `eof` says no more will come (which completes a close-delimited body).
/// `bodiless` is true for the answer to a `HEAD` request, which has no body whatever its
/// headers say.
pub fn take_response(
    buf: &mut BytesMut,
    bodiless: bool,
    eof: bool,
) -> Result<Option<Parsed>, String> {
    loop {
        let Some((head_len, head)) = parse_head(buf, bodiless)? else {
            return Ok(None);
        };
        if (100..200).contains(&head.status) {
            // Interim responses (100 Continue, 103 Early Hints) precede the real one.
            buf.advance(head_len);
            continue;
        }
        let Some((body, consumed)) = frame_body(&buf[head_len..], head.framing, eof)? else {
            return Ok(None);
        };
        buf.advance(head_len + consumed);
        let closes = head.closes || matches!(head.framing, Framing::UntilClose);
        let response = AppResponse {
            status: head.status,
            headers: end_to_end_headers(&head.headers),
            body,
        };
        return Ok(Some(Parsed { response, closes }));
    }
}

fn parse_head(buf: &[u8], bodiless: bool) -> Result<Option<(usize, Head)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let http10 = response.version == Some(0);
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for header in response.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| format!("malformed response header name {:?}", header.name))?;
        let value = HeaderValue::from_bytes(header.value)
            .map_err(|_| format!("malformed value of response header {name}"))?;
        headers.append(name, value);
    }
    let framing = framing(&headers, status, bodiless)?;
    let closes = connection_closes(&headers, http10);
    Ok(Some((
        head_len,
        Head {
            status,
            headers,
            framing,
            closes,
        },
    )))
}

/// RFC 9112 §6.3, the cases a server can produce.
fn framing(headers: &HeaderMap, status: u16, bodiless: bool) -> Result<Framing, String> {
    if bodiless || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Length(0));
    }
    if let Some(te) = headers.get(http::header::TRANSFER_ENCODING) {
        let last = te.to_str().unwrap_or("").rsplit(',').next().unwrap_or("");
        return if last.trim().eq_ignore_ascii_case("chunked") {
            Ok(Framing::Chunked)
        } else {
            Ok(Framing::UntilClose)
        };
    }
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(Framing::UntilClose);
    };
    if lengths.any(|other| other != first) {
        return Err("conflicting Content-Length headers".to_string());
    }
    let length: usize = first
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("malformed Content-Length {first:?}"))?;
    if length > MAX_APP_RESPONSE_BYTES {
        return Err(too_large());
    }
    Ok(Framing::Length(length))
}

fn connection_closes(headers: &HeaderMap, http10: bool) -> bool {
    let tokens: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let has = |token: &str| tokens.iter().any(|t| t == token);
    has("close") || (http10 && !has("keep-alive"))
}

fn too_large() -> String {
    format!("response body larger than {MAX_APP_RESPONSE_BYTES} bytes")
}

/// The body at the front of `rest` and how many bytes it took, once it is complete.
fn frame_body(rest: &[u8], framing: Framing, eof: bool) -> Result<Option<(Bytes, usize)>, String> {
    match framing {
        Framing::Length(n) if rest.len() >= n => Ok(Some((Bytes::copy_from_slice(&rest[..n]), n))),
        Framing::Length(_) => Ok(None),
        Framing::UntilClose if rest.len() > MAX_APP_RESPONSE_BYTES => Err(too_large()),
        Framing::UntilClose if eof => Ok(Some((Bytes::copy_from_slice(rest), rest.len()))),
        Framing::UntilClose => Ok(None),
        Framing::Chunked => dechunk(rest),
    }
}

/// Decodes a chunked body if it is complete. Walking the chunk sizes again on every new
/// read costs one step per chunk, not per byte, so partial bodies are cheap to retry.
fn dechunk(rest: &[u8]) -> Result<Option<(Bytes, usize)>, String> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&rest[pos..]) {
            Ok(httparse::Status::Complete(parsed)) => parsed,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("malformed chunk size".to_string()),
        };
        pos += size_len;
        let size = usize::try_from(size).map_err(|_| too_large())?;
        if body.len().saturating_add(size) > MAX_APP_RESPONSE_BYTES {
            return Err(too_large());
        }
        if size == 0 {
            return Ok(skip_trailers(&rest[pos..]).map(|n| (Bytes::from(body), pos + n)));
        }
        if rest.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[pos..pos + size]);
        if &rest[pos + size..pos + size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".to_string());
        }
        pos += size + 2;
    }
}

/// Length of the trailer section after the last chunk, up to and including its final CRLF.
fn skip_trailers(rest: &[u8]) -> Option<usize> {
    if rest.starts_with(b"\r\n") {
        return Some(2);
    }
    rest.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_contract::RequestTag;

    fn request(headers: Vec<(&str, &str)>) -> OrderedRequest {
        OrderedRequest {
            tag: RequestTag::default(),
            method: "POST".into(),
            uri: "/append?x=1".into(),
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body: Bytes::from_static(b"hello"),
            idempotency_key: None,
            time_unix_us: 0,
            seed: 0,
        }
    }

    fn stamp() -> Stamp {
        Stamp {
            index: 7,
            time_rfc3339: "2026-11-22T00:00:00.000000Z".into(),
            seed: 9,
        }
    }

    #[test]
    fn request_is_encoded_with_stamp_and_length_and_without_forged_headers() {
        let mut out = Vec::new();
        let req = request(vec![
            ("content-type", "text/plain"),
            ("haven-index", "1"),
            ("host", "client.example"),
        ]);
        encode_request(&mut out, "127.0.0.1:6001", &req, &stamp()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /append?x=1 HTTP/1.1\r\nhost: 127.0.0.1:6001\r\ncontent-type: text/plain\r\n\
             haven-index: 7\r\nhaven-time: 2026-11-22T00:00:00.000000Z\r\nhaven-seed: 9\r\n\
             content-length: 5\r\n\r\nhello"
        );
    }

    #[test]
    fn request_with_invalid_header_is_refused() {
        let mut out = Vec::new();
        let req = request(vec![("x-bad", "a\r\nb")]);
        let err = encode_request(&mut out, "h", &req, &stamp()).unwrap_err();
        assert_eq!(err, "invalid value of header x-bad");
    }

    fn take(bytes: &[u8], eof: bool) -> Result<Option<Parsed>, String> {
        let mut buf = BytesMut::from(bytes);
        take_response(&mut buf, false, eof)
    }

    #[test]
    fn pipelined_responses_are_framed_one_by_one() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 201 Created\r\ncontent-length: 1\r\nlocation: /line/0\r\n\r\n0\
               HTTP/1.1 100 Continue\r\n\r\n\
               HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nt: 1\r\n\r\n\
               HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200"[..],
        );
        let first = take_response(&mut buf, false, false).unwrap().unwrap();
        assert_eq!(first.response.status, 201);
        assert_eq!(first.response.body, Bytes::from_static(b"0"));
        assert_eq!(
            first.response.headers,
            vec![("location".to_string(), Bytes::from_static(b"/line/0"))]
        );
        let second = take_response(&mut buf, false, false).unwrap().unwrap();
        assert_eq!(second.response.status, 200);
        assert_eq!(second.response.body, Bytes::from_static(b"abcde"));
        assert!(!second.closes);
        let third = take_response(&mut buf, false, false).unwrap().unwrap();
        assert_eq!(third.response.status, 204);
        assert!(take_response(&mut buf, false, false).unwrap().is_none());
        assert_eq!(&buf[..], b"HTTP/1.1 200");
    }

    #[test]
    fn partial_bodies_wait_for_more_bytes() {
        assert!(
            take(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", false)
                .unwrap()
                .is_none()
        );
        assert!(
            take(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nab",
                false
            )
            .unwrap()
            .is_none()
        );
        assert!(
            take(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n",
                false
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn close_delimited_body_ends_at_eof_and_closes() {
        assert!(
            take(b"HTTP/1.1 200 OK\r\n\r\nabc", false)
                .unwrap()
                .is_none()
        );
        let parsed = take(b"HTTP/1.1 200 OK\r\n\r\nabc", true).unwrap().unwrap();
        assert_eq!(parsed.response.body, Bytes::from_static(b"abc"));
        assert!(parsed.closes);
    }

    #[test]
    fn connection_close_and_http10_are_noticed() {
        let closing = take(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert!(closing.unwrap().unwrap().closes);
        let old = take(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false);
        assert!(old.unwrap().unwrap().closes);
        let kept = take(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert!(!kept.unwrap().unwrap().closes);
    }

    #[test]
    fn head_answers_have_no_body() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"[..]);
        let parsed = take_response(&mut buf, true, false).unwrap().unwrap();
        assert!(parsed.response.body.is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_responses_are_errors_with_a_reason() {
        assert_eq!(
            take(b"HTTX/1.1 200 OK\r\n\r\n", false).unwrap_err(),
            "malformed response head: invalid HTTP version"
        );
        assert_eq!(
            take(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            )
            .unwrap_err(),
            "conflicting Content-Length headers"
        );
        assert_eq!(
            take(
                b"HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\n\r\n",
                false
            )
            .unwrap_err(),
            too_large()
        );
        assert_eq!(
            take(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                false
            )
            .unwrap_err(),
            "malformed chunk size"
        );
    }
}
