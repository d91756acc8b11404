//! `/exec/{namespace}/{pod}/{container}`: a process in a running container, its stdio over a
//! WebSocket with Kubernetes' channel protocol (`v5.channel.k8s.io`, or `v4`):
//!
//! | channel | direction | data |
//! |---|---|---|
//! | 0 | client → server | stdin |
//! | 1 | server → client | stdout (with a tty: the terminal) |
//! | 2 | server → client | stderr |
//! | 3 | server → client | a `metav1.Status` when the process has exited (then the socket closes) |
//! | 4 | client → server | terminal size, `{"Width": w, "Height": h}` |
//! | 255 | client → server | v5 only: close channel N (`[255, 0]`: stdin reached end-of-file) |
//!
//! `kubectl cp` is an exec of `tar`: into the pod `tar xmf -` reads the archive from stdin and
//! needs the close of channel 0 to see its end; out of the pod `tar cf -` writes it to stdout.
//! The status frame is sent only after stdout and stderr reached end-of-file, so no output
//! is lost. A client that goes away (closes or drops the socket) before the process ends has
//! it killed.

use futures::{SinkExt as _, StreamExt as _};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, warn};

use super::websocket::{self, channel_message, split_channel};
use super::{Body, StreamServer, status};
use crate::runtime::{ExecRequest, Runtime};

/// The subprotocols served, preferred first.
pub const PROTOCOLS: &[&str] = &[V5, V4];
const V5: &str = "v5.channel.k8s.io";
const V4: &str = "v4.channel.k8s.io";

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// The exec query: `command` (repeated), `stdin`, `stdout`, `stderr`, `tty`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Attach stdin.
    pub stdin: bool,
    /// Attach stdout.
    pub stdout: bool,
    /// Attach stderr.
    pub stderr: bool,
    /// Allocate a terminal.
    pub tty: bool,
}

impl ExecOptions {
    /// Parses the query; the message of the 400 when it is unusable.
    pub fn from_query(query: Option<&str>) -> Result<ExecOptions, String> {
        let mut options = ExecOptions::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let flag = matches!(value.as_ref(), "true" | "1" | "");
            match key.as_ref() {
                "command" => options.command.push(value.into_owned()),
                "input" | "stdin" => options.stdin = flag,
                "output" | "stdout" => options.stdout = flag,
                "error" | "stderr" => options.stderr = flag,
                "tty" => options.tty = flag,
                _ => {}
            }
        }
        if options.command.is_empty() {
            return Err("you must specify at least one command for the container".into());
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        if options.tty && options.stderr {
            // As kubelet: a terminal merges stderr into stdout.
            options.stderr = false;
        }
        Ok(options)
    }
}

/// The Status sent on the error channel for an exit code.
pub fn exit_status(command: &[String], code: i32) -> serde_json::Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// The Status sent on the error channel when the process could not run.
fn failure_status(message: &str) -> serde_json::Value {
    json!({"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError", "code": 500})
}

/// Validates the request, answers the upgrade and runs the session once upgraded.
pub(super) fn handle(
    server: &StreamServer,
    mut req: Request<Incoming>,
    namespace: &str,
    pod_name: &str,
    container: &str,
) -> Response<Body> {
    let options = match ExecOptions::from_query(req.uri().query()) {
        Ok(o) => o,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let pod = match server.pod(namespace, pod_name) {
        Ok(p) => p,
        Err(refusal) => return refusal.response(),
    };
    let info = match StreamServer::container(pod_name, &pod, container) {
        Ok(c) => c,
        Err(refusal) => return refusal.response(),
    };
    let Some(container_id) = info.container_id.filter(|_| info.running) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("container {container} in pod {pod_name} is not running: cannot exec in a stopped container"),
        );
    };
    let accepted = match websocket::accept(&mut req, PROTOCOLS) {
        Ok(a) => a,
        Err(refusal) => return refusal.response(),
    };
    let runtime = server.runtime.clone();
    let v5 = accepted.protocol == V5;
    tokio::spawn(async move {
        match websocket::socket(accepted.upgrade).await {
            Ok(socket) => session(socket, runtime, container_id, options, v5).await,
            Err(e) => debug!(error = %e, "exec: the upgrade did not complete"),
        }
    });
    accepted.response
}

/// One exec over an upgraded WebSocket.
async fn session(socket: websocket::Socket, runtime: Runtime, container_id: String, options: ExecOptions, v5: bool) {
    let (mut sink, mut source) = socket.split();
    let request = ExecRequest {
        args: options.command.clone(),
        tty: options.tty,
        stdin: options.stdin,
        env: Vec::new(),
    };
    let mut process = match runtime.exec(&container_id, &request).await {
        Ok(p) => p,
        Err(e) => {
            let status = failure_status(&e.to_string());
            let _ = sink
                .send(Message::Binary(
                    channel_message(ERROR, status.to_string().as_bytes()).into(),
                ))
                .await;
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
    };
    // Everything the client gets goes through one writer task.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() {
                break;
            }
            if closing {
                break;
            }
        }
        let _ = sink.close().await;
    });

    // Client → process: stdin, resize, close.
    let control = process.control();
    let mut stdin = process.stdin.take();
    let mut reader = tokio::spawn(async move {
        while let Some(message) = source.next().await {
            let data = match message {
                Ok(Message::Binary(data)) => data,
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            match split_channel(&data) {
                Some((STDIN, bytes)) => {
                    if let Some(pipe) = stdin.as_mut()
                        && pipe.write_all(bytes).await.is_err()
                    {
                        // The process closed its stdin; drop what else comes.
                        stdin = None;
                    }
                }
                Some((RESIZE, json)) => {
                    #[derive(serde::Deserialize)]
                    #[serde(rename_all = "PascalCase")]
                    struct Size {
                        width: u32,
                        height: u32,
                    }
                    match serde_json::from_slice::<Size>(json) {
                        Ok(size) if options.tty => {
                            if let Err(e) = control.resize(size.width, size.height).await {
                                debug!(error = %e, "exec: resizing the terminal failed");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => debug!(error = %e, "exec: a resize message that is not {{Width, Height}}"),
                    }
                }
                Some((CLOSE, [STDIN, ..])) if v5 => {
                    if stdin.take().is_some()
                        && let Err(e) = control.close_stdin().await
                    {
                        warn!(error = %e, "exec: closing stdin failed");
                    }
                }
                _ => {}
            }
        }
        // The client went away (or closed its side): the process gets end-of-file on stdin.
        if stdin.take().is_some() {
            let _ = control.close_stdin().await;
        }
    });

    // Process → client: stdout and stderr until end-of-file.
    let copy = |pipe: Option<tokio::net::unix::pipe::Receiver>, channel: u8, forward: bool| {
        let out_tx = out_tx.clone();
        async move {
            let Some(mut pipe) = pipe else { return };
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        // Output the client did not ask for is read and dropped, so the
                        // process does not block on a full pipe.
                        if forward
                            && out_tx
                                .send(Message::Binary(channel_message(channel, &buf[..n]).into()))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
    };
    let stdout = process.stdout.take();
    let stderr = process.stderr.take();
    // Until the process has exited and its output is drained, or the client goes away: then
    // the process is killed (nobody is left to read it or to feed it).
    let finished = {
        let run = async {
            tokio::join!(
                copy(stdout, STDOUT, options.stdout),
                copy(stderr, STDERR, options.stderr),
                process.wait()
            )
        };
        tokio::select! {
            (_, _, exit) = run => Some(exit),
            _ = &mut reader => None,
        }
    };
    let Some(exit) = finished else {
        debug!(container = %container_id, exec = process.id(), "exec: the client went away; killing the process");
        writer.abort();
        process.cleanup().await;
        return;
    };
    debug!(container = %container_id, exec = process.id(), ?exit, "exec finished");
    let status = match exit {
        Ok(code) => exit_status(&options.command, code),
        Err(e) => failure_status(&format!("waiting for the process: {e}")),
    };
    let _ = out_tx
        .send(Message::Binary(
            channel_message(ERROR, status.to_string().as_bytes()).into(),
        ))
        .await;
    let _ = out_tx
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    drop(out_tx);
    let _ = writer.await;
    reader.abort();
    process.cleanup().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_queries_parse_like_kubelet() {
        let o = ExecOptions::from_query(Some(
            "command=sh&command=-c&command=echo+hi&stdin=true&stdout=true&tty=false",
        ))
        .unwrap();
        assert_eq!(o.command, ["sh", "-c", "echo hi"]);
        assert!(o.stdin && o.stdout && !o.stderr && !o.tty);
        let tty = ExecOptions::from_query(Some("command=sh&stdout=true&stderr=true&tty=true")).unwrap();
        assert!(tty.tty && !tty.stderr, "a terminal has no separate stderr");
        assert!(
            ExecOptions::from_query(Some("stdout=true"))
                .unwrap_err()
                .contains("at least one command")
        );
        assert!(
            ExecOptions::from_query(Some("command=ls"))
                .unwrap_err()
                .contains("at least 1 of stdin")
        );
    }

    #[test]
    fn exit_codes_become_statuses_kubectl_reads() {
        assert_eq!(exit_status(&["true".into()], 0)["status"], "Success");
        let failed = exit_status(&["sh".into(), "-c".into(), "exit 3".into()], 3);
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
    }
}
