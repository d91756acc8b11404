//! `GET /containerLogs/{namespace}/{pod}/{container}`: a container's log file, filtered as
//! kubelet does (`tailLines`, `sinceSeconds`/`sinceTime`, `timestamps`, `limitBytes`,
//! `previous`), and followed (`follow=true`).
//!
//! Following: after the existing lines, the file is polled every [`FOLLOW_POLL`] for new
//! lines while the container's current run is running (the [`super::PodDirectory`] says so,
//! asked on each poll). Once it has exited (or was replaced by a new run), what is left in the
//! file is sent and the response ends. A client that disconnects ends it too.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::time::Duration;

use super::cri::{LogLine, parse_line};

/// How often a followed log file is checked for new lines.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The query of a log request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep streaming new lines until the container exits.
    pub follow: bool,
    /// The previous (terminated) run's log instead of the current one.
    pub previous: bool,
    /// Only the last N lines.
    pub tail_lines: Option<u64>,
    /// Only lines written at or after this time (raw lines, which have no time, always pass).
    pub since: Option<jiff::Timestamp>,
    /// Prefix each line with the time it was written.
    pub timestamps: bool,
    /// Stop after this many bytes.
    pub limit_bytes: Option<u64>,
}

impl LogOptions {
    /// Parses kubelet's query parameters; `now` anchors `sinceSeconds`.
    pub fn from_query(query: Option<&str>, now: jiff::Timestamp) -> Result<LogOptions, String> {
        let mut options = LogOptions::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let flag = || matches!(value.as_ref(), "true" | "1" | "");
            let number = || {
                value
                    .parse::<i64>()
                    .map_err(|_| format!("{key}={value:?} is not a number"))
            };
            match key.as_ref() {
                "follow" => options.follow = flag(),
                "previous" => options.previous = flag(),
                "timestamps" => options.timestamps = flag(),
                "tailLines" => {
                    let n = number()?;
                    // Kubernetes: a negative tail means everything.
                    options.tail_lines = (n >= 0).then_some(n as u64);
                }
                "limitBytes" => {
                    let n = number()?;
                    if n < 1 {
                        return Err(format!("limitBytes={n} must be at least 1"));
                    }
                    options.limit_bytes = Some(n as u64);
                }
                "sinceSeconds" => {
                    let n = number()?;
                    if n < 1 {
                        return Err(format!("sinceSeconds={n} must be at least 1"));
                    }
                    options.since = Some(
                        now.checked_sub(jiff::SignedDuration::from_secs(n))
                            .map_err(|e| format!("sinceSeconds={n}: {e}"))?,
                    );
                }
                "sinceTime" => {
                    options.since = Some(
                        value
                            .parse()
                            .map_err(|e| format!("sinceTime={value:?} is not an RFC 3339 time: {e}"))?,
                    );
                }
                _ => {}
            }
        }
        Ok(options)
    }
}

/// Turns file lines into output, line by line, applying `since` and `timestamps`.
struct Renderer<'a> {
    options: &'a LogOptions,
    /// The next piece starts a new logical line (the previous one was full).
    at_line_start: bool,
    /// The logical line being assembled (pieces of `P` lines up to the `F`).
    current: Vec<u8>,
    /// Whether the current logical line passes `since` (decided by its first piece).
    keep: bool,
}

impl Renderer<'_> {
    /// Feeds one file line; returns a finished logical line to output, if any.
    fn line(&mut self, line: &LogLine<'_>) -> Option<Vec<u8>> {
        if self.at_line_start {
            self.keep = match (self.options.since, line.time) {
                (Some(since), Some(time)) => time >= since,
                _ => true,
            };
            if self.options.timestamps
                && let Some(time) = line.time_text
            {
                self.current.extend_from_slice(time.as_bytes());
                self.current.push(b' ');
            }
        }
        self.current.extend_from_slice(line.content);
        if line.partial {
            self.at_line_start = false;
            return None;
        }
        self.current.push(b'\n');
        self.at_line_start = true;
        let done = std::mem::take(&mut self.current);
        self.keep.then_some(done)
    }
}

/// Streams `path` to `sink` as the options say; `running` tells (when following) whether the
/// container still runs. `sink` returns false when the client has gone. Blocking: run it on a
/// blocking thread.
pub fn stream_log(
    path: &Path,
    options: &LogOptions,
    running: &dyn Fn() -> bool,
    sink: &mut dyn FnMut(Vec<u8>) -> bool,
) -> std::io::Result<()> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        // Not written yet (a container that has not started, or wrote nothing with the plain
        // file logging): an empty log.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !options.follow {
                return Ok(());
            }
            loop {
                if let Ok(_file) = std::fs::File::open(path) {
                    break;
                }
                if !running() {
                    return Ok(());
                }
                std::thread::sleep(FOLLOW_POLL);
            }
            std::fs::File::open(path)?
        }
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut renderer = Renderer {
        options,
        at_line_start: true,
        current: Vec::new(),
        keep: true,
    };
    let mut budget = options.limit_bytes.unwrap_or(u64::MAX);
    // Sends `chunk` within the byte budget; false: stop (budget spent or client gone).
    let mut send = |mut chunk: Vec<u8>| -> bool {
        if chunk.is_empty() {
            return true;
        }
        if chunk.len() as u64 > budget {
            chunk.truncate(budget as usize);
        }
        budget -= chunk.len() as u64;
        sink(chunk) && budget > 0
    };

    // The existing lines; with a tail, only the last N logical lines are kept.
    let mut tail: VecDeque<Vec<u8>> = VecDeque::new();
    let push = |tail: &mut VecDeque<Vec<u8>>, batch: &mut Vec<u8>, out: Vec<u8>| match options.tail_lines {
        Some(0) => {}
        Some(limit) => {
            if tail.len() as u64 == limit {
                tail.pop_front();
            }
            tail.push_back(out);
        }
        None => batch.extend_from_slice(&out),
    };
    let mut batch = Vec::new();
    let mut raw = Vec::new();
    let mut offset = 0u64;
    loop {
        raw.clear();
        let n = reader.read_until(b'\n', &mut raw)?;
        if n == 0 {
            break;
        }
        if raw.last() != Some(&b'\n') {
            // End of file in the middle of a line: when following, it may still be being
            // written (read again from `offset`); otherwise it is the last line.
            if !options.follow
                && let Some(out) = renderer.line(&parse_line(&raw))
            {
                push(&mut tail, &mut batch, out);
            }
            break;
        }
        offset += n as u64;
        let Some(out) = renderer.line(&parse_line(&raw[..raw.len() - 1])) else {
            continue;
        };
        push(&mut tail, &mut batch, out);
        if batch.len() >= 32 * 1024 && !send(std::mem::take(&mut batch)) {
            return Ok(());
        }
    }
    for line in tail {
        batch.extend_from_slice(&line);
    }
    if !send(std::mem::take(&mut batch)) || !options.follow {
        return Ok(());
    }

    // Following: poll for lines appended from `offset` on.
    let mut file = reader.into_inner();
    let mut pending: Vec<u8> = Vec::new();
    let mut last_round = false;
    loop {
        let stopped = !running();
        file.seek(SeekFrom::Start(offset))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh)?;
        offset += fresh.len() as u64;
        pending.extend_from_slice(&fresh);
        let mut out = Vec::new();
        let complete = pending.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in pending[..complete].split_inclusive(|b| *b == b'\n') {
            if let Some(rendered) = renderer.line(&parse_line(&line[..line.len() - 1])) {
                out.extend_from_slice(&rendered);
            }
        }
        pending.drain(..complete);
        if last_round && !pending.is_empty() {
            // The container is gone and its last line has no newline: it is complete.
            let line = std::mem::take(&mut pending);
            if let Some(rendered) = renderer.line(&parse_line(&line)) {
                out.extend_from_slice(&rendered);
            }
        }
        if !send(out) {
            return Ok(());
        }
        if last_round {
            return Ok(());
        }
        // One more read after the container stopped: the shim or driver may still be writing
        // its last lines.
        if stopped {
            last_round = true;
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-11-27T12:00:00.000000000Z stdout F one\n\
                       2026-11-27T12:00:01.000000000Z stderr F two\n\
                       2026-11-27T12:00:02.000000000Z stdout P thr\n\
                       2026-11-27T12:00:02.000000000Z stdout F ee\n\
                       2026-11-27T12:00:03.000000000Z stdout F four\n";

    fn read(contents: &str, query: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, contents).unwrap();
        let options = LogOptions::from_query(Some(query), "2026-11-27T12:00:04Z".parse().unwrap()).unwrap();
        let mut out = Vec::new();
        stream_log(&path, &options, &|| false, &mut |chunk| {
            out.extend_from_slice(&chunk);
            true
        })
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn queries_parse_and_bad_values_say_why() {
        let o = LogOptions::from_query(
            Some("follow=true&tailLines=10&timestamps=true&limitBytes=5&previous=true&sinceSeconds=4"),
            "2026-11-27T12:00:04Z".parse().unwrap(),
        )
        .unwrap();
        assert!(o.follow && o.timestamps && o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(10), Some(5)));
        assert_eq!(o.since, Some("2026-11-27T12:00:00Z".parse().unwrap()));
        let now = jiff::Timestamp::now();
        assert_eq!(
            LogOptions::from_query(Some("tailLines=-1"), now).unwrap().tail_lines,
            None
        );
        assert!(
            LogOptions::from_query(Some("tailLines=x"), now)
                .unwrap_err()
                .contains("not a number")
        );
        assert!(
            LogOptions::from_query(Some("sinceTime=yesterday"), now)
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(
            LogOptions::from_query(Some("limitBytes=0"), now)
                .unwrap_err()
                .contains("at least 1")
        );
    }

    #[test]
    fn lines_are_joined_filtered_and_cut() {
        assert_eq!(read(LOG, ""), "one\ntwo\nthree\nfour\n");
        assert_eq!(read(LOG, "tailLines=2"), "three\nfour\n");
        assert_eq!(read(LOG, "tailLines=0"), "");
        assert_eq!(read(LOG, "tailLines=9"), "one\ntwo\nthree\nfour\n");
        assert_eq!(read(LOG, "sinceTime=2026-11-27T12:00:02Z"), "three\nfour\n");
        assert_eq!(read(LOG, "sinceSeconds=2"), "three\nfour\n");
        assert_eq!(read(LOG, "limitBytes=6"), "one\ntw");
        assert_eq!(
            read(LOG, "timestamps=true&tailLines=2"),
            "2026-11-27T12:00:02.000000000Z three\n2026-11-27T12:00:03.000000000Z four\n"
        );
        // Raw lines (the shim's plain file logging) pass through, the last one without a
        // newline too.
        assert_eq!(read("plain\nlast", "sinceSeconds=1&timestamps=true"), "plain\nlast\n");
    }

    #[test]
    fn following_reads_appended_lines_until_the_container_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2026-11-27T12:00:00Z stdout F one\n").unwrap();
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer = {
            let path = path.clone();
            let running = running.clone();
            std::thread::spawn(move || {
                std::thread::sleep(FOLLOW_POLL * 2);
                let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
                std::io::Write::write_all(&mut f, b"2026-11-27T12:00:01Z stdout F tw").unwrap();
                std::thread::sleep(FOLLOW_POLL * 2);
                std::io::Write::write_all(&mut f, b"o\n2026-11-27T12:00:02Z stdout F three\n").unwrap();
                running.store(false, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        stream_log(
            &path,
            &options,
            &|| running.load(std::sync::atomic::Ordering::SeqCst),
            &mut |chunk| {
                out.extend_from_slice(&chunk);
                true
            },
        )
        .unwrap();
        writer.join().unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\nthree\n");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
