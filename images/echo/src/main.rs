//! `weir-echo [PORT]`: the server of the `weir.local/echo` test image. Every HTTP request
//! gets `200 OK` and one line, `<pod name> <pod IP>:<port>\n`: the pod name from
//! `$POD_NAME`, else `$HOSTNAME`, else /etc/hostname; the IP is the local address the
//! connection arrived on (the pod IP, whatever service address the client dialled). Tests
//! use it to see which backend a load balancer chose. `GET /healthz` answers `ok`.
//!
//! Written on std alone rather than hyper: the image must be one small static binary, and
//! the server reads a request head and writes a fixed reply, nothing more.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Larger request heads are refused (431): the server reads heads only.
const MAX_HEAD: usize = 16 * 1024;

fn main() {
    let port: u16 = match std::env::args().nth(1).or_else(|| std::env::var("PORT").ok()) {
        None => 8080,
        Some(text) => text.parse().unwrap_or_else(|_| {
            eprintln!("weir-echo: the port must be a number from 1 to 65535, not {text:?}");
            std::process::exit(2);
        }),
    };
    let name = pod_name();
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("weir-echo: cannot listen on 0.0.0.0:{port}: {e}");
        std::process::exit(1);
    });
    eprintln!("weir-echo: {name} listening on 0.0.0.0:{port}");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &name);
                });
            }
            Err(e) => eprintln!("weir-echo: accept: {e}"),
        }
    }
}

fn pod_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .filter_map(|var| std::env::var(var).ok())
        .chain(std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Answers the requests of one connection until the client closes it or asks to.
fn serve(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut head = request_line.len();
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            head += line.len();
            if head > MAX_HEAD {
                writer.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((field, value)) = line.split_once(':') {
                let value = value.trim();
                if field.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                } else if field.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                }
            }
        }
        // Bodies are read and ignored.
        std::io::copy(&mut (&mut reader).take(content_length as u64), &mut std::io::sink())?;
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let body = if path == "/healthz" {
            "ok\n".to_owned()
        } else {
            format!("{name} {}:{}\n", local.ip(), local.port())
        };
        let connection = if close { "close" } else { "keep-alive" };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}
