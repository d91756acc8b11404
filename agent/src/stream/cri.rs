//! Container log files in the CRI format (what kubelet reads and `crictl logs` shows), and
//! the containerd binary logging driver that writes them.
//!
//! One line per line the container wrote: `<RFC 3339 time> <stdout|stderr> <F|P> <content>`,
//! `F` for a full line, `P` for a piece of a longer one (lines are cut at
//! [`MAX_LINE`] bytes; the pieces up to the final `F` make one line). Files written by the
//! shim's plain `file://` logging (no logger configured) hold the raw output; the reader takes
//! those lines as they are, without a time.
//!
//! The driver: containerd's runc shim, given the stdio URI `binary:///path/to/weir?log-driver=<log
//! path>`, starts `weir log-driver <log path>` with the container's stdout on fd 3, its stderr
//! on fd 4 and a pipe on fd 5 it waits on until the driver closes it ("ready"); the environment
//! carries CONTAINER_ID and CONTAINER_NAMESPACE (containerd's `pkg/process/io.go`,
//! `NewBinaryIO`/`NewBinaryCmd`). The shim sends SIGTERM when the task is deleted and SIGKILLs
//! after 12 s; the driver ignores SIGTERM and stops at end-of-file on both pipes, so the last
//! lines are not lost.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::FromRawFd as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Longest line written in one piece; longer ones are split into `P` pieces (containerd's CRI
/// plugin uses the same 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

/// Which stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The container's stdout.
    Stdout,
    /// The container's stderr.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Appends one CRI log line (with its newline) to `out`.
pub fn format_line(out: &mut Vec<u8>, time: jiff::Timestamp, stream: Stream, partial: bool, content: &[u8]) {
    // Nanoseconds always: fixed-width times sort as text and parse as RFC 3339.
    let _ = write!(out, "{time:.9} {} {} ", stream.name(), if partial { 'P' } else { 'F' });
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// One line of a log file, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine<'a> {
    /// When it was written; `None` for a raw line.
    pub time: Option<jiff::Timestamp>,
    /// The time as written (for `timestamps=true`).
    pub time_text: Option<&'a str>,
    /// A piece of a longer line (`P`): its content has no newline of its own.
    pub partial: bool,
    /// What the container wrote, without the newline.
    pub content: &'a [u8],
}

/// Parses one line (without its newline): CRI format, else a raw line.
pub fn parse_line(line: &[u8]) -> LogLine<'_> {
    let raw = LogLine {
        time: None,
        time_text: None,
        partial: false,
        content: line,
    };
    let mut parts = line.splitn(4, |b| *b == b' ');
    let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        return raw;
    };
    let content = parts.next().unwrap_or_default();
    if !matches!(stream, b"stdout" | b"stderr") || !matches!(tag, b"F" | b"P") {
        return raw;
    }
    let Ok(time_text) = std::str::from_utf8(time) else {
        return raw;
    };
    let Ok(parsed) = time_text.parse::<jiff::Timestamp>() else {
        return raw;
    };
    LogLine {
        time: Some(parsed),
        time_text: Some(time_text),
        partial: tag == b"P",
        content,
    }
}

/// Cuts a stream's output into CRI lines.
struct Splitter {
    stream: Stream,
    pending: Vec<u8>,
}

impl Splitter {
    /// Feeds `data`; appends the lines it completes to `out`.
    fn feed(&mut self, data: &[u8], now: jiff::Timestamp, out: &mut Vec<u8>) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            self.pending.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            self.flush_long(now, out);
            format_line(out, now, self.stream, false, &self.pending);
            self.pending.clear();
        }
        self.pending.extend_from_slice(rest);
        self.flush_long(now, out);
    }

    /// Writes `P` pieces while more than [`MAX_LINE`] bytes are pending.
    fn flush_long(&mut self, now: jiff::Timestamp, out: &mut Vec<u8>) {
        while self.pending.len() > MAX_LINE {
            format_line(out, now, self.stream, true, &self.pending[..MAX_LINE]);
            self.pending.drain(..MAX_LINE);
        }
    }

    /// At end-of-file: what is left is the last line, though it had no newline.
    fn finish(&mut self, now: jiff::Timestamp, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            format_line(out, now, self.stream, false, &self.pending);
            self.pending.clear();
        }
    }
}

/// Copies `input` into `log` as CRI lines until end-of-file; each batch of lines is one
/// `write` (O_APPEND), so the two streams' lines never interleave mid-line.
fn copy_stream(mut input: File, stream: Stream, log: &Mutex<File>) -> std::io::Result<()> {
    let mut splitter = Splitter {
        stream,
        pending: Vec::new(),
    };
    let mut buf = vec![0u8; 32 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.clear();
        if n == 0 {
            splitter.finish(jiff::Timestamp::now(), &mut out);
        } else {
            splitter.feed(&buf[..n], jiff::Timestamp::now(), &mut out);
        }
        if !out.is_empty() {
            log.lock().unwrap_or_else(|e| e.into_inner()).write_all(&out)?;
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// The binary logging driver (`weir log-driver <log path>`): see the module docs. Returns
/// once the container's stdout and stderr are closed.
pub fn run_log_driver(log_path: &Path) -> Result<(), String> {
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    let fd_open = |fd: i32| {
        // SAFETY: F_GETFD only inspects the descriptor table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    };
    if !(fd_open(3) && fd_open(4) && fd_open(5)) {
        return Err(
            "weir log-driver is containerd's logging driver: the shim starts it with the container's stdout on \
             fd 3, stderr on fd 4 and a ready pipe on fd 5; it is not meant to be run by hand"
                .into(),
        );
    }
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| format!("opening the log file {}: {e}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log));
    // SAFETY: fds 3 and 4 are the pipes the shim passed (checked open above) and nothing else
    // in this process owns them.
    let (stdout, stderr) = unsafe { (File::from_raw_fd(3), File::from_raw_fd(4)) };
    // Ready: the shim goes on starting the container once fd 5 is closed.
    // SAFETY: fd 5 is the shim's ready pipe, owned by nothing else here.
    unsafe { libc::close(5) };
    let stderr_log = log.clone();
    let stderr_thread = std::thread::spawn(move || copy_stream(stderr, Stream::Stderr, &stderr_log));
    let stdout_result = copy_stream(stdout, Stream::Stdout, &log);
    let stderr_result = stderr_thread
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the stderr copier panicked")));
    stdout_result
        .and(stderr_result)
        .map_err(|e| format!("copying the container's output to {}: {e}", log_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn lines_are_written_and_parsed_back() {
        let mut out = Vec::new();
        format_line(
            &mut out,
            at("2026-11-27T12:00:00.5Z"),
            Stream::Stderr,
            false,
            b"hello world",
        );
        assert_eq!(out, b"2026-11-27T12:00:00.500000000Z stderr F hello world\n");
        let line = parse_line(&out[..out.len() - 1]);
        assert_eq!(line.time, Some(at("2026-11-27T12:00:00.5Z")));
        assert_eq!(line.time_text, Some("2026-11-27T12:00:00.500000000Z"));
        assert!(!line.partial);
        assert_eq!(line.content, b"hello world");
        // An empty line keeps its (empty) content.
        let empty = parse_line(b"2026-11-27T12:00:00Z stdout F ");
        assert_eq!((empty.content, empty.partial), (&b""[..], false));
        let partial = parse_line(b"2026-11-27T12:00:00Z stdout P abc");
        assert!(partial.partial);
    }

    #[test]
    fn raw_lines_have_no_time() {
        for raw in [
            &b"plain output"[..],
            b"2026-11-27T12:00:00Z stdout X nope",
            b"yesterday stdout F nope",
            b"",
        ] {
            let line = parse_line(raw);
            assert_eq!((line.time, line.content), (None, raw), "{raw:?}");
        }
    }

    #[test]
    fn splitter_cuts_lines_and_long_lines() {
        let now = at("2026-11-27T12:00:00Z");
        let mut s = Splitter {
            stream: Stream::Stdout,
            pending: Vec::new(),
        };
        let mut out = Vec::new();
        s.feed(b"one\ntw", now, &mut out);
        s.feed(b"o\n\nthree", now, &mut out);
        s.finish(now, &mut out);
        let text = String::from_utf8(out).unwrap();
        let contents: Vec<&str> = text.lines().map(|l| l.splitn(4, ' ').nth(3).unwrap()).collect();
        assert_eq!(contents, ["one", "two", "", "three"]);

        let mut out = Vec::new();
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        s.feed(&long, now, &mut out);
        s.feed(b"\n", now, &mut out);
        let text = String::from_utf8(out).unwrap();
        let tags: Vec<&str> = text.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(tags, ["P", "P", "F"]);
        let total: usize = text.lines().map(|l| l.splitn(4, ' ').nth(3).unwrap().len()).sum();
        assert_eq!(total, long.len());
    }
}
