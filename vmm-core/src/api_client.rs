//! The client side of the API, for `bulkhead ls`, `pause`, `resume`, `stop`, `kill`, `fault` and
//! `stats`: one HTTP/1.1 request per connection over the VM's Unix socket, the response head
//! parsed by `httparse`, the body read to its `Content-Length`. Every wait is bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where VM sockets live by default: `/run/bulkhead/ID.sock`.
pub const RUNTIME_DIR: &str = "/run/bulkhead";
/// Largest response accepted.
const MAX_RESPONSE: usize = 4 << 20;

/// Errors talking to a VM.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot reach the VM at {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to the VM")]
    Io(#[source] std::io::Error),
    /// The answer is not HTTP.
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// The socket of VM `vm`: a path if it contains `/`, else `RUNTIME_DIR/vm.sock`.
pub fn socket_for(vm: &str) -> PathBuf {
    if vm.contains('/') {
        PathBuf::from(vm)
    } else {
        Path::new(RUNTIME_DIR).join(format!("{vm}.sock"))
    }
}

/// An answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
}

impl Answer {
    /// The `fault_message` of an error answer, else the body.
    pub fn message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("fault_message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| self.body.clone())
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends `method path` with an optional JSON `body` to the VM listening on `sock`, waiting at
/// most `timeout` for each step.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let mut s = UnixStream::connect(sock).map_err(|source| ClientError::Connect { path: sock.into(), source })?;
    s.set_read_timeout(Some(timeout)).map_err(ClientError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(ClientError::Io)?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes())).map_err(ClientError::Io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Bounded: each read waits at most `timeout`, and the total is capped.
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = resp.code.ok_or_else(|| ClientError::Malformed("no status".into()))?;
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
                let want = head_len + len.unwrap_or(0);
                if len.is_some_and(|l| l > MAX_RESPONSE) {
                    return Err(ClientError::Malformed("answer too large".into()));
                }
                while buf.len() < want {
                    let n = s.read(&mut chunk).map_err(ClientError::Io)?;
                    if n == 0 {
                        return Err(ClientError::Malformed("answer cut short".into()));
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&buf[head_len..want]).into_owned();
                return Ok(Answer { status, body });
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(ClientError::Malformed(e.to_string())),
        }
        if buf.len() > MAX_RESPONSE {
            return Err(ClientError::Malformed("answer too large".into()));
        }
        let n = s.read(&mut chunk).map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Malformed("connection closed before the answer".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The VMs with a socket in `dir` that answer (stale sockets are skipped), as `(id, socket)`.
pub fn list(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let id = p.file_name()?.to_str()?.strip_suffix(".sock")?.to_string();
            UnixStream::connect(&p).ok().map(|_| (id, p))
        })
        .collect();
    out.sort();
    out
}
