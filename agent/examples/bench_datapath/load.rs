//! The two ends of the traffic, each run as this binary in a role of its own inside its
//! namespace: the backend server and the load client. The client prints one JSON line
//! ([`LoadSample`], every latency); the parent merges the runs of a mode and summarizes.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

const REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";
const REPLY: &[u8] = b"HTTP/1.0 200 OK\r\n\r\nok\n";
/// A SYN retransmit takes 1 s: a connection that needs one counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections before the measured window of each client run (neighbour entries, caches).
const WARMUP: Duration = Duration::from_millis(50);

/// Accepts, reads one request, writes the reply and closes, one connection after another
/// (the client is sequential, so one thread keeps up).
pub fn server(listen: SocketAddrV4) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("server: binding {listen}"))?;
    println!("ready");
    std::io::stdout().flush().context("server: writing the ready line")?;
    let mut buf = [0u8; 256];
    for stream in listener.incoming() {
        // A client reset mid-way is the client's failure to count, not the server's.
        let Ok(mut stream) = stream else { continue };
        if stream.read(&mut buf).is_ok_and(|n| n > 0) {
            let _ = stream.write_all(REPLY);
        }
    }
    Ok(())
}

/// What client runs measured, raw: runs of one mode are merged, then summarized.
#[derive(Clone, Debug, Default)]
pub struct LoadSample {
    pub failures: u64,
    /// Seconds of measured connections (warm-up excluded).
    pub elapsed_s: f64,
    pub latencies_us: Vec<u32>,
    pub first_error: Option<String>,
    /// The connection rate of each merged client run (slice).
    pub slice_rates: Vec<f64>,
}

impl LoadSample {
    pub fn to_json(&self) -> Value {
        json!({
            "failures": self.failures,
            "elapsed_s": self.elapsed_s,
            "latencies_us": self.latencies_us,
            "first_error": self.first_error,
        })
    }

    pub fn from_json(value: &Value) -> Result<LoadSample> {
        let number = |key: &str| {
            value[key]
                .as_f64()
                .with_context(|| format!("client output lacks {key}"))
        };
        let latencies_us = value["latencies_us"]
            .as_array()
            .context("client output lacks latencies_us")?
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .context("a latency that is not a u32")
            })
            .collect::<Result<_>>()?;
        Ok(LoadSample {
            failures: number("failures")? as u64,
            elapsed_s: number("elapsed_s")?,
            latencies_us,
            first_error: value["first_error"].as_str().map(str::to_owned),
            slice_rates: Vec::new(),
        })
    }

    pub fn merge(&mut self, other: LoadSample) {
        if other.elapsed_s > 0.0 {
            self.slice_rates.push(other.latencies_us.len() as f64 / other.elapsed_s);
        }
        self.failures += other.failures;
        self.elapsed_s += other.elapsed_s;
        self.latencies_us.extend(other.latencies_us);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// The rate is the median of the slices' rates: a slice that a burst of other work on
    /// the machine stalled (milliseconds per connection instead of tens of microseconds)
    /// does not drag the mode down, as it would the overall rate, which is kept beside it.
    pub fn summary(&self) -> LoadResult {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let mut rates = self.slice_rates.clone();
        rates.sort_by(f64::total_cmp);
        let median_rate = match rates.len() {
            0 => 0.0,
            n if n % 2 == 1 => rates[n / 2],
            n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
        };
        LoadResult {
            connections: sorted.len() as u64,
            failures: self.failures,
            conns_per_s: median_rate,
            overall_conns_per_s: if self.elapsed_s > 0.0 {
                sorted.len() as f64 / self.elapsed_s
            } else {
                0.0
            },
            p50_us: f64::from(percentile(&sorted, 0.50)),
            p99_us: f64::from(percentile(&sorted, 0.99)),
            first_error: self.first_error.clone(),
        }
    }
}

/// Connections per second and latency percentiles of one mode at one size in one run.
#[derive(Clone, Debug)]
pub struct LoadResult {
    pub connections: u64,
    pub failures: u64,
    /// Median over the slices.
    pub conns_per_s: f64,
    /// All connections over all the measured time.
    pub overall_conns_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn to_json(&self) -> Value {
        json!({
            "connections": self.connections,
            "failures": self.failures,
            "conns_per_s": self.conns_per_s,
            "overall_conns_per_s": self.overall_conns_per_s,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "first_error": self.first_error,
        })
    }
}

/// Sequential connect → write → read → close to `target` for `duration` after a warm-up;
/// prints a [`LoadSample`] as JSON. Sockets close with SO_LINGER 0 (a RST): no TIME_WAIT,
/// so the ephemeral ports never run out whatever the rate.
pub fn client(target: SocketAddrV4, duration: Duration) -> Result<()> {
    let warmup_end = Instant::now() + WARMUP;
    while Instant::now() < warmup_end {
        if connection(target).is_err() {
            // A failing target fails in the measured window too, and is counted there.
            break;
        }
    }
    let mut sample = LoadSample {
        latencies_us: Vec::with_capacity(65536),
        ..LoadSample::default()
    };
    let start = Instant::now();
    while start.elapsed() < duration {
        let began = Instant::now();
        match connection(target) {
            Ok(()) => sample
                .latencies_us
                .push(u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX)),
            Err(e) => {
                sample.failures += 1;
                sample.first_error.get_or_insert_with(|| format!("{target}: {e:#}"));
            }
        }
    }
    sample.elapsed_s = start.elapsed().as_secs_f64();
    println!("{}", sample.to_json());
    Ok(())
}

/// Nearest-rank percentile of sorted values; 0 when there are none.
fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn connection(target: SocketAddrV4) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&target.into(), CONNECT_TIMEOUT).context("connect")?;
    linger_zero(&stream).context("setting SO_LINGER")?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .context("setting the read timeout")?;
    stream.write_all(REQUEST).context("write")?;
    let mut reply = [0u8; 64];
    let mut got = 0;
    loop {
        let n = stream.read(&mut reply[got..]).context("read")?;
        if n == 0 {
            break;
        }
        got += n;
        if got == reply.len() {
            break;
        }
    }
    if &reply[..got] != REPLY {
        bail!("unexpected reply {:?}", String::from_utf8_lossy(&reply[..got]));
    }
    Ok(())
}

/// SO_LINGER {on, 0}: close sends a RST. std has no stable setter for it.
fn linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized `linger`.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{LoadSample, percentile};

    #[test]
    fn rate_is_the_median_of_the_slices() {
        let slice = |connections: u32, elapsed_s: f64| LoadSample {
            elapsed_s,
            latencies_us: vec![40; connections as usize],
            ..LoadSample::default()
        };
        let mut merged = LoadSample::default();
        for part in [slice(100, 0.01), slice(10, 0.01), slice(120, 0.01)] {
            merged.merge(part);
        }
        let summary = merged.summary();
        assert_eq!(summary.conns_per_s, 10_000.0);
        assert!((summary.overall_conns_per_s - 230.0 / 0.03).abs() < 1e-6);
        assert_eq!(summary.connections, 230);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
