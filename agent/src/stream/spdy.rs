//! SPDY/3.1 framing, the server side of what kubectl's port-forward speaks.
//!
//! Written by hand because no maintained Rust crate implements SPDY (it was superseded by
//! HTTP/2 everywhere but Kubernetes' streaming, where Go's `moby/spdystream` is the peer).
//! Only what that peer uses is here: SYN_STREAM/SYN_REPLY with name/value header blocks
//! (zlib with the SPDY/3 dictionary, one compression context per direction for the whole
//! connection), DATA with FIN, RST_STREAM, PING, GOAWAY; SETTINGS, HEADERS and WINDOW_UPDATE
//! are decoded and may be ignored (spdystream does not enforce flow-control windows).
//!
//! Frames (all integers big-endian):
//! - control: `1 | version(15) | type(16) | flags(8) | length(24) | data`
//! - data: `0 | stream id(31) | flags(8) | length(24) | data`

use bytes::{Buf as _, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The SPDY version spoken.
pub const VERSION: u16 = 3;
/// FIN: the sender's last frame on the stream.
pub const FLAG_FIN: u8 = 0x01;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Largest frame accepted: kubectl's data frames are its 32 KiB copy buffers.
const MAX_FRAME: usize = 4 << 20;
/// Largest decompressed header block accepted.
const MAX_HEADERS: usize = 1 << 20;

/// RST_STREAM status: the stream was refused.
pub const RST_REFUSED_STREAM: u32 = 3;
/// RST_STREAM status: canceled.
pub const RST_CANCEL: u32 = 5;

/// The header compression dictionary of SPDY/3 (draft-mbelshe-httpbis-spdy-00, 2.6.10.1):
/// length-prefixed header names and values, then a run of common text.
pub fn dictionary() -> &'static [u8] {
    static DICTIONARY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICTIONARY.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505\
            203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized\
            403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable\
            Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT\
            chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,\
            text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";
        let mut out = Vec::new();
        for word in WORDS {
            out.extend_from_slice(&(word.len() as u32).to_be_bytes());
            out.extend_from_slice(word.as_bytes());
        }
        out.extend_from_slice(TAIL.as_bytes());
        out
    })
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A new stream from the peer, with its headers (names lowercase).
    SynStream {
        /// The stream.
        stream_id: u32,
        /// FIN and UNIDIRECTIONAL flags.
        flags: u8,
        /// Its headers.
        headers: Vec<(String, String)>,
    },
    /// The answer to a SYN_STREAM.
    SynReply {
        /// The stream.
        stream_id: u32,
        /// FIN flag.
        flags: u8,
        /// Its headers.
        headers: Vec<(String, String)>,
    },
    /// A stream aborted.
    RstStream {
        /// The stream.
        stream_id: u32,
        /// Why.
        status: u32,
    },
    /// A ping to echo.
    Ping {
        /// Its id.
        id: u32,
    },
    /// The peer is going away.
    GoAway {
        /// The last stream it processed.
        last_stream_id: u32,
        /// Why.
        status: u32,
    },
    /// Stream data.
    Data {
        /// The stream.
        stream_id: u32,
        /// FIN flag.
        flags: u8,
        /// The bytes.
        data: Vec<u8>,
    },
    /// SETTINGS, HEADERS, WINDOW_UPDATE and unknown control frames: nothing to do.
    Other {
        /// The control frame type.
        kind: u16,
    },
}

/// What is wrong with the peer's frames.
#[derive(Debug, thiserror::Error)]
#[error("SPDY protocol error: {0}")]
pub struct ProtocolError(pub String);

/// One connection's framing state: the two header compression contexts.
pub struct Codec {
    inflate: Decompress,
    deflate: Compress,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new()
    }
}

impl Codec {
    /// A fresh connection's codec.
    pub fn new() -> Codec {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(dictionary())
            .expect("setting a dictionary on a fresh deflate stream");
        Codec {
            inflate: Decompress::new(true),
            deflate,
        }
    }

    /// Takes one whole frame off the front of `buf`; `None` until one has fully arrived.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let length = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if length > MAX_FRAME {
            return Err(ProtocolError(format!("a frame of {length} bytes")));
        }
        if buf.len() < 8 + length {
            return Ok(None);
        }
        let head = buf.split_to(8);
        let body = buf.split_to(length);
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: body.to_vec(),
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(ProtocolError(format!("SPDY version {version}, not 3")));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let mut body = &body[..];
        let need = |body: &[u8], n: usize| {
            if body.len() < n {
                Err(ProtocolError(format!("a control frame of type {kind} is too short")))
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            SYN_STREAM => {
                need(body, 10)?;
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let _associated = body.get_u32();
                let _priority_and_slot = body.get_u16();
                let headers = self.headers(body)?;
                Frame::SynStream {
                    stream_id,
                    flags,
                    headers,
                }
            }
            SYN_REPLY => {
                need(body, 4)?;
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let headers = self.headers(body)?;
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers,
                }
            }
            RST_STREAM => {
                need(body, 8)?;
                Frame::RstStream {
                    stream_id: body.get_u32() & 0x7fff_ffff,
                    status: body.get_u32(),
                }
            }
            PING => {
                need(body, 4)?;
                Frame::Ping { id: body.get_u32() }
            }
            GOAWAY => {
                need(body, 4)?;
                let last_stream_id = body.get_u32() & 0x7fff_ffff;
                let status = if body.len() >= 4 { body.get_u32() } else { 0 };
                Frame::GoAway { last_stream_id, status }
            }
            HEADERS => {
                // Its header block still advances the shared decompression context.
                need(body, 4)?;
                let _stream_id = body.get_u32();
                self.headers(body)?;
                Frame::Other { kind }
            }
            SETTINGS | WINDOW_UPDATE => Frame::Other { kind },
            _ => Frame::Other { kind },
        };
        Ok(Some(frame))
    }

    /// Decompresses and parses a name/value header block.
    fn headers(&mut self, compressed: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
        let mut out: Vec<u8> = Vec::with_capacity(256);
        let mut input = compressed;
        loop {
            out.reserve(1024);
            let before_in = self.inflate.total_in();
            match self.inflate.decompress_vec(input, &mut out, FlushDecompress::Sync) {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|e| ProtocolError(format!("the header dictionary: {e}")))?;
                }
                Err(e) => return Err(ProtocolError(format!("decompressing headers: {e}"))),
            }
            let consumed = (self.inflate.total_in() - before_in) as usize;
            input = &input[consumed..];
            if out.len() > MAX_HEADERS {
                return Err(ProtocolError("a header block over 1 MiB".into()));
            }
            // Done once all input is consumed and the output buffer was not the limit.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        parse_header_block(&out)
    }

    /// Encodes a SYN_REPLY with `headers`.
    pub fn syn_reply(&mut self, stream_id: u32, flags: u8, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut body = stream_id.to_be_bytes().to_vec();
        body.extend_from_slice(&self.compress_headers(headers));
        control(SYN_REPLY, flags, &body)
    }

    fn compress_headers(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut block = (headers.len() as u32).to_be_bytes().to_vec();
        for (name, value) in headers {
            block.extend_from_slice(&(name.len() as u32).to_be_bytes());
            block.extend_from_slice(name.to_ascii_lowercase().as_bytes());
            block.extend_from_slice(&(value.len() as u32).to_be_bytes());
            block.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut input = &block[..];
        loop {
            out.reserve(256);
            let before = self.deflate.total_in();
            let status = self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("deflate into a growing buffer");
            input = &input[(self.deflate.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() && status != Status::BufError {
                break;
            }
        }
        out
    }
}

/// Parses a decompressed header block: count, then (name length, name, value length,
/// value) with several values of one name separated by NUL.
fn parse_header_block(mut block: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let short = || ProtocolError("a truncated header block".into());
    if block.len() < 4 {
        return Err(short());
    }
    let count = block.get_u32();
    let mut headers = Vec::new();
    let take = |block: &mut &[u8]| -> Result<String, ProtocolError> {
        if block.len() < 4 {
            return Err(short());
        }
        let n = block.get_u32() as usize;
        if block.len() < n {
            return Err(short());
        }
        let text = String::from_utf8_lossy(&block[..n]).into_owned();
        block.advance(n);
        Ok(text)
    };
    for _ in 0..count {
        let name = take(&mut block)?.to_ascii_lowercase();
        let value = take(&mut block)?;
        for v in value.split('\0') {
            headers.push((name.clone(), v.to_string()));
        }
    }
    Ok(headers)
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(body);
    out
}

/// A DATA frame.
pub fn data(stream_id: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(data);
    out
}

/// A PING (echoing the peer's id).
pub fn ping(id: u32) -> Vec<u8> {
    control(PING, 0, &id.to_be_bytes())
}

/// A RST_STREAM.
pub fn rst_stream(stream_id: u32, status: u32) -> Vec<u8> {
    let mut body = stream_id.to_be_bytes().to_vec();
    body.extend_from_slice(&status.to_be_bytes());
    control(RST_STREAM, 0, &body)
}

/// A GOAWAY.
pub fn goaway(last_stream_id: u32) -> Vec<u8> {
    let mut body = last_stream_id.to_be_bytes().to_vec();
    body.extend_from_slice(&0u32.to_be_bytes());
    control(GOAWAY, 0, &body)
}

/// A SYN_STREAM, as a client sends it (used by the tests' client).
pub fn syn_stream(codec: &mut Codec, stream_id: u32, flags: u8, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut body = stream_id.to_be_bytes().to_vec();
    body.extend_from_slice(&0u32.to_be_bytes());
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&codec.compress_headers(headers));
    control(SYN_STREAM, flags, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423, "the SPDY/3 dictionary is 1423 bytes");
        assert_eq!(&d[..11], b"\x00\x00\x00\x07options");
        assert!(d.ends_with(b",*,enq=0."));
        // Its Adler-32, the dictionary id a zlib stream that uses it carries.
        let mut deflate = Compress::new(Compression::default(), true);
        let id = deflate.set_dictionary(d).unwrap();
        let mut a: u32 = 1;
        let mut b: u32 = 0;
        for &byte in d {
            a = (a + byte as u32) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(id, (b << 16) | a);
    }

    #[test]
    fn frames_round_trip_through_two_codecs() {
        let mut client = Codec::new();
        let mut server = Codec::new();
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&syn_stream(
            &mut client,
            1,
            0,
            &[("streamType", "error"), ("port", "8080"), ("requestID", "0")],
        ));
        wire.extend_from_slice(&syn_stream(
            &mut client,
            3,
            0,
            &[("streamType", "data"), ("port", "8080"), ("requestID", "0")],
        ));
        wire.extend_from_slice(&data(3, FLAG_FIN, b"GET / HTTP/1.0\r\n\r\n"));
        wire.extend_from_slice(&ping(7));
        // Frames arrive in pieces (WebSocket messages do not align with frames).
        let mut received = BytesMut::new();
        let mut frames = Vec::new();
        for chunk in wire.chunks(5) {
            received.extend_from_slice(chunk);
            while let Some(frame) = server.decode(&mut received).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 4, "{frames:?}");
        assert_eq!(
            frames[0],
            Frame::SynStream {
                stream_id: 1,
                flags: 0,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("port".into(), "8080".into()),
                    ("requestid".into(), "0".into())
                ]
            }
        );
        assert!(matches!(&frames[1], Frame::SynStream { stream_id: 3, headers, .. } if headers[0].1 == "data"));
        assert_eq!(
            frames[2],
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: b"GET / HTTP/1.0\r\n\r\n".to_vec()
            }
        );
        assert_eq!(frames[3], Frame::Ping { id: 7 });

        // And back: replies decode with the client's context.
        let mut back = BytesMut::new();
        back.extend_from_slice(&server.syn_reply(1, 0, &[]));
        back.extend_from_slice(&server.syn_reply(3, 0, &[]));
        back.extend_from_slice(&rst_stream(3, RST_CANCEL));
        assert_eq!(
            client.decode(&mut back).unwrap(),
            Some(Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![]
            })
        );
        assert!(matches!(
            client.decode(&mut back).unwrap(),
            Some(Frame::SynReply { stream_id: 3, .. })
        ));
        assert_eq!(
            client.decode(&mut back).unwrap(),
            Some(Frame::RstStream {
                stream_id: 3,
                status: RST_CANCEL
            })
        );
        assert_eq!(client.decode(&mut back).unwrap(), None);
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut codec = Codec::new();
        let mut v2 = BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert!(codec.decode(&mut v2).unwrap_err().to_string().contains("version 2"));
        let mut huge = BytesMut::from(&[0x00, 0x00, 0x00, 0x01, 0, 0xff, 0xff, 0xff][..]);
        assert!(codec.decode(&mut huge).is_err());
    }
}
