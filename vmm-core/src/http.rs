//! The API's HTTP transport: a listening Unix socket, the peer's credentials checked at accept,
//! one thread per connection (at most [`MAX_CONNECTIONS`]), HTTP/1.1 by `hyper`.
//!
//! What reaches the rest of the core is an [`HttpRequest`] (method, path, body of at most
//! `max_body` bytes) and what comes back a [`Reply`]; no HTTP type leaves this module.
//!
//! Who may talk to the VMM: root and the VMM's own effective uid. The socket file is 0600 (see
//! [`crate::api`]), so the kernel already refuses everyone else at `connect`; the credentials
//! the kernel recorded for the peer (`SO_PEERCRED`) are checked again here, so a socket whose
//! mode an operator loosened, or a connected fd handed to another user, still gets nothing but
//! `403`.
//!
//! Every wait is bounded: a connection that sends nothing for [`IDLE_TIMEOUT`] is closed (a
//! silent client holds one thread, never the others), a reply the peer does not read within
//! [`WRITE_TIMEOUT`] is abandoned, the accept loop looks at its stop flag every [`POLL`]. The
//! sockets are non-blocking; each connection's thread drives hyper's future itself and sleeps in
//! `poll(2)` on the socket when hyper waits for it ([`drive`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, SERVER};
use hyper::{Request, Response, StatusCode};

use crate::api::Reply;

/// Connections served at once. When all are open, the oldest one idle for [`EVICT_IDLE`] is
/// closed for a new one; if none is, the new one waits up to [`EVICT_IDLE`] for one to be.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection must have been idle (no request in progress, none started) before it
/// may be closed to make room.
pub const EVICT_IDLE: Duration = Duration::from_secs(1);
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply the peer does not take within this long is abandoned with its connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// When the server stops, how long the connections get to finish the replies they are writing.
const DRAIN: Duration = Duration::from_secs(2);

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listener could not be set up.
    #[error("listening socket")]
    Listener(#[source] std::io::Error),
    /// The accept thread could not be started.
    #[error("spawning the accept thread")]
    Thread(#[source] std::io::Error),
}

/// An HTTP method, as the routes know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// Any other method (no route takes it).
    Other(String),
}

impl From<&str> for Verb {
    fn from(s: &str) -> Self {
        match s {
            "GET" => Self::Get,
            "PUT" => Self::Put,
            "PATCH" => Self::Patch,
            other => Self::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Other(s) => s,
        })
    }
}

/// One request, read in full.
#[derive(Debug)]
pub struct HttpRequest {
    /// The method.
    pub verb: Verb,
    /// The path, without the query.
    pub path: String,
    /// The body (at most the server's `max_body` bytes).
    pub body: Vec<u8>,
}

/// What answers requests: called on the connection's thread, may block (bounded by the caller).
pub type Handler = dyn Fn(&HttpRequest) -> Reply + Send + Sync;

/// Who may use the API: root and one uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPolicy {
    uid: u32,
}

impl PeerPolicy {
    /// Root and this process's effective uid.
    pub fn own_uid() -> Self {
        Self { uid: nix::unistd::geteuid().as_raw() }
    }

    /// Root and `uid`.
    pub fn uid(uid: u32) -> Self {
        Self { uid }
    }

    /// Whether a peer running as `uid` may use the API.
    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || uid == self.uid
    }
}

/// The open connections: to end them at once when the server stops, and to make room for a new
/// one when [`MAX_CONNECTIONS`] are open.
#[derive(Debug, Default)]
struct Open {
    conns: Mutex<HashMap<u64, Conn>>,
    next: AtomicU64,
}

/// One open connection.
#[derive(Debug)]
struct Conn {
    /// A clone of its stream (shutting it down ends the connection).
    stream: UnixStream,
    /// Its activity, shared with its thread.
    activity: Arc<Activity>,
}

/// Whether a connection is answering a request, and when it last started or finished one.
#[derive(Debug)]
struct Activity {
    busy: AtomicBool,
    since: Mutex<std::time::Instant>,
}

impl Activity {
    fn new() -> Self {
        Self { busy: AtomicBool::new(false), since: Mutex::new(std::time::Instant::now()) }
    }

    fn set(&self, busy: bool) {
        self.busy.store(busy, Ordering::SeqCst);
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    /// Idle (no request in progress) for at least [`EVICT_IDLE`].
    fn evictable(&self) -> bool {
        !self.busy.load(Ordering::SeqCst)
            && self.since.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= EVICT_IDLE
    }
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection (a clone of its stream). When [`MAX_CONNECTIONS`] are open, the
    /// oldest one idle for [`EVICT_IDLE`] (silent, or between requests: HTTP lets a server close
    /// those) is closed to make room, waiting up to [`EVICT_IDLE`] for one to become so; `None`
    /// if none did.
    fn admit(&self, stream: &UnixStream) -> Option<(u64, Arc<Activity>)> {
        let deadline = std::time::Instant::now() + EVICT_IDLE + POLL;
        loop {
            let mut open = self.lock();
            if open.len() < MAX_CONNECTIONS {
                let clone = stream.try_clone().ok()?;
                let id = self.next.fetch_add(1, Ordering::Relaxed);
                let activity = Arc::new(Activity::new());
                open.insert(id, Conn { stream: clone, activity: activity.clone() });
                return Some((id, activity));
            }
            let idle = open.iter().filter(|(_, c)| c.activity.evictable()).map(|(id, _)| *id).min();
            if let Some(c) = idle.and_then(|id| open.remove(&id)) {
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
                continue;
            }
            drop(open);
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn shut(&self, how: std::net::Shutdown) {
        for c in self.lock().values() {
            let _ = c.stream.shutdown(how);
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Ends every connection: no more requests are read, a reply being written gets up to
    /// [`DRAIN`] to go out (an action that stops the VMM answers before it goes), then the rest
    /// are cut.
    fn close_all(&self) {
        self.shut(std::net::Shutdown::Read);
        let deadline = std::time::Instant::now() + DRAIN;
        while !self.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.shut(std::net::Shutdown::Both);
    }
}

/// A running server. Dropping it stops accepting, ends the open connections (letting replies
/// being written go out) and removes the socket file, all on the accept thread: the dropping
/// thread only sets a flag and joins (the VMM thread's seccomp filter allows neither `shutdown`
/// nor `unlink`).
#[derive(Debug)]
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

/// What each connection thread shares.
struct Shared {
    handler: Arc<Handler>,
    policy: PeerPolicy,
    max_body: usize,
    open: Arc<Open>,
    /// Hands a connection to an idle connection thread (a rendezvous: only a thread waiting
    /// takes it; otherwise a new thread is started).
    handoff: crossbeam_channel::Sender<Accepted>,
    /// The idle threads' end.
    waiting: crossbeam_channel::Receiver<Accepted>,
    /// Connection threads idle, waiting for a connection (at most [`IDLE_THREADS`]).
    idle: std::sync::atomic::AtomicUsize,
    /// Set when the server stops: idle threads exit.
    stop: Arc<AtomicBool>,
}

/// A connection accepted and admitted, on its way to a thread.
struct Accepted {
    id: u64,
    stream: UnixStream,
    refusal: Option<String>,
    activity: Arc<Activity>,
}

/// Connection threads kept waiting once their connection ended, so that the next connection
/// does not pay for a new thread.
const IDLE_THREADS: usize = 4;

impl HttpServer {
    /// Serves `listener` (bound at `path`, removed when the server stops) with `handler`,
    /// admitting the peers `policy` allows, bodies of at most `max_body` bytes.
    pub fn start(
        listener: UnixListener,
        path: PathBuf,
        handler: Arc<Handler>,
        policy: PeerPolicy,
        max_body: usize,
        confine: Option<bulkhead_policies::Policy>,
    ) -> Result<Self, HttpError> {
        listener.set_nonblocking(true).map_err(HttpError::Listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (handoff, waiting) = crossbeam_channel::bounded(0);
        let shared = Arc::new(Shared {
            handler,
            policy,
            max_body,
            open: Arc::new(Open::default()),
            handoff,
            waiting,
            idle: std::sync::atomic::AtomicUsize::new(0),
            stop: stop.clone(),
        });
        let flag = stop.clone();
        let acceptor = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // The connection threads this one creates inherit its filter.
                if let Some(p) = confine {
                    crate::jail::confine_or_abort(p);
                }
                accept_loop(&listener, &flag, &shared);
                drop(listener);
                let _ = std::fs::remove_file(&path);
                shared.open.close_all();
            })
            .map_err(HttpError::Thread)?;
        Ok(Self { stop, acceptor: Some(acceptor) })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Accepts until `stop`: each connection is checked and handed to a thread of its own.
fn accept_loop(listener: &UnixListener, stop: &AtomicBool, shared: &Arc<Shared>) {
    while !stop.load(Ordering::SeqCst) {
        match ipc::wait::wait_readable(listener.as_fd(), POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                crate::warn_limited!("API: waiting for connections: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => admit(stream, shared),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Out of fds, for instance: wait a little rather than spin.
                crate::warn_limited!("API: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Checks the peer, registers the connection and starts its thread; a connection that cannot
/// be served is closed.
fn admit(stream: UnixStream, shared: &Arc<Shared>) {
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    let refusal = match peer {
        Ok(c) if shared.policy.allows(c.uid()) => None,
        Ok(c) => {
            crate::warn_limited!(
                "API: refused a client running as uid {} (pid {}): only root and uid {} may use this VMM",
                c.uid(),
                c.pid(),
                shared.policy.uid
            );
            Some(format!(
                "API access refused: the client runs as uid {}; only root and uid {} may use this VMM.",
                c.uid(),
                shared.policy.uid
            ))
        }
        Err(e) => {
            crate::warn_limited!("API: cannot read a client's credentials ({e}); refused");
            Some("API access refused: the client's credentials cannot be read.".to_string())
        }
    };
    if let Err(e) = stream.set_nonblocking(true) {
        crate::warn_limited!("API: setting up a connection: {e}");
        return;
    }
    let Some((id, activity)) = shared.open.admit(&stream) else {
        crate::warn_limited!("API: {MAX_CONNECTIONS} connections are busy; closing a new one");
        return;
    };
    // An idle connection thread takes it, or a new one is started.
    let accepted = match shared.handoff.try_send(Accepted { id, stream, refusal, activity }) {
        Ok(()) => return,
        Err(e) => e.into_inner(),
    };
    let s = shared.clone();
    let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || connection_thread(&s, accepted));
    if let Err(e) = spawned {
        shared.open.remove(id);
        crate::warn_limited!("API: no thread for a connection: {e}");
    }
}

/// Serves `first`, then, while fewer than [`IDLE_THREADS`] others wait, waits for the next
/// connection (until the server stops).
fn connection_thread(shared: &Arc<Shared>, first: Accepted) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut next = Some(first);
    while let Some(Accepted { id, stream, refusal, activity }) = next.take() {
        serve_connection(stream, shared, refusal, &activity);
        shared.open.remove(id);
        if shared.idle.fetch_add(1, SeqCst) >= IDLE_THREADS {
            shared.idle.fetch_sub(1, SeqCst);
            return;
        }
        // Bounded: each turn looks at the stop flag.
        while next.is_none() && !shared.stop.load(SeqCst) {
            next = shared.waiting.recv_timeout(POLL).ok();
        }
        shared.idle.fetch_sub(1, SeqCst);
    }
}

/// Serves one connection until the peer closes it, goes silent, or the server stops. A refused
/// peer gets `403` with `refusal` for every request.
fn serve_connection(stream: UnixStream, shared: &Arc<Shared>, refusal: Option<String>, activity: &Arc<Activity>) {
    let s = shared.clone();
    let busy = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let s = s.clone();
        let refusal = refusal.clone();
        let busy = busy.clone();
        async move {
            busy.set(true);
            let reply = match refusal {
                Some(why) => Reply::fault(403, why),
                None => match read_request(req, s.max_body).await {
                    Ok(r) => (s.handler)(&r),
                    Err(reply) => reply,
                },
            };
            busy.set(false);
            Ok::<_, Infallible>(into_response(reply))
        }
    });
    let wants = Wants::default();
    let fd = match stream.try_clone() {
        Ok(f) => f,
        Err(e) => {
            crate::warn_limited!("API: setting up a connection: {e}");
            return;
        }
    };
    let io = NonBlocking { stream, wants: wants.clone() };
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(io, service);
    match drive(conn, fd.as_fd(), &wants) {
        Some(Ok(())) => {}
        Some(Err(e)) => log::debug!("API connection ended: {e}"),
        None => log::debug!("API connection closed: idle, or its reply not taken"),
    }
}

/// The request's method, path and body, or the reply refusing it (a body over `max_body`, or
/// one that could not be read).
async fn read_request(req: Request<Incoming>, max_body: usize) -> Result<HttpRequest, Reply> {
    let too_big = |n: usize| {
        Reply::error(format!("Request payload with size {n} is larger than the limit of {max_body} allowed by server."))
    };
    let declared =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|&n| n > max_body) {
        return Err(too_big(n));
    }
    let verb = Verb::from(req.method().as_str());
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), max_body).collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_big(max_body + 1)),
        Err(e) => return Err(Reply::error(format!("cannot read the request body: {e}"))),
    };
    Ok(HttpRequest { verb, path, body })
}

fn into_response(r: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    resp.headers_mut().insert(SERVER, HeaderValue::from_static("Bulkhead API"));
    resp
}

/// What the connection's I/O waits for: [`READ`] and [`WRITE`] bits, set by a call that would
/// block, taken by [`drive`].
type Wants = Arc<std::sync::atomic::AtomicU8>;
const READ: u8 = 1;
const WRITE: u8 = 2;

/// A non-blocking stream as hyper's I/O: a call that would block notes what it waits for and
/// returns `Pending`; [`drive`] then waits for the socket.
struct NonBlocking {
    stream: UnixStream,
    wants: Wants,
}

impl NonBlocking {
    fn io<T>(
        &mut self,
        bit: u8,
        mut call: impl FnMut(&mut UnixStream) -> std::io::Result<T>,
    ) -> Poll<std::io::Result<T>> {
        // Bounded: EINTR only.
        loop {
            match call(&mut self.stream) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wants.fetch_or(bit, Ordering::SeqCst);
                    return Poll::Pending;
                }
                other => return Poll::Ready(other),
            }
        }
    }
}

impl hyper::rt::Read for NonBlocking {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut tmp = [0u8; 8192];
        let want = buf.remaining().min(tmp.len());
        self.get_mut().io(READ, |s| s.read(&mut tmp[..want])).map_ok(|n| buf.put_slice(&tmp[..n]))
    }
}

impl hyper::rt::Write for NonBlocking {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().io(WRITE, |s| s.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.get_mut().stream.shutdown(std::net::Shutdown::Write))
    }
}

/// Wakes the thread that runs [`drive`], noting that it was woken.
struct FlagWaker {
    woken: AtomicBool,
    thread: std::thread::Thread,
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Runs a connection's future on this thread. When it is pending on its socket ([`Wants`]),
/// waits for the socket: at most [`IDLE_TIMEOUT`] for the peer to send, [`WRITE_TIMEOUT`] for it
/// to take a reply. When it is pending on hyper's own hand-offs, they woke it already (they run
/// on this thread), or a bounded park covers it. `None`: a wait ran out, and the connection is
/// dropped.
fn drive<F: Future>(fut: F, fd: std::os::fd::BorrowedFd<'_>, wants: &Wants) -> Option<F::Output> {
    use std::os::fd::AsRawFd;
    let mut fut = std::pin::pin!(fut);
    let flag = Arc::new(FlagWaker { woken: AtomicBool::new(false), thread: std::thread::current() });
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut quiet = Duration::ZERO;
    loop {
        flag.woken.store(false, Ordering::SeqCst);
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if flag.woken.load(Ordering::SeqCst) {
            continue;
        }
        let w = wants.swap(0, Ordering::SeqCst);
        if w == 0 {
            // Pending on nothing this thread can wait for: should not happen; bounded anyway.
            std::thread::park_timeout(POLL);
            quiet += POLL;
            if quiet >= IDLE_TIMEOUT {
                return None;
            }
            continue;
        }
        quiet = Duration::ZERO;
        let mut events = 0;
        if w & READ != 0 {
            events |= libc::POLLIN;
        }
        if w & WRITE != 0 {
            events |= libc::POLLOUT;
        }
        let limit = if w & WRITE != 0 { WRITE_TIMEOUT } else { IDLE_TIMEOUT };
        let mut fds = [libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 }];
        match ipc::wait::poll(&mut fds, limit) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(dir: &std::path::Path, policy: PeerPolicy) -> (HttpServer, PathBuf) {
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handler: Arc<Handler> = Arc::new(|r: &HttpRequest| Reply {
            status: 200,
            body: format!("{} {} {}", r.verb, r.path, String::from_utf8_lossy(&r.body)),
            content_type: "text/plain",
        });
        (HttpServer::start(listener, path.clone(), handler, policy, 64, None).expect("start"), path)
    }

    fn exchange(path: &std::path::Path, request: &str) -> String {
        let mut s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(request.as_bytes()).expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn requests_reach_the_handler_and_big_bodies_do_not() {
        let dir = tempfile::tempdir().expect("dir");
        let (srv, path) = server(dir.path(), PeerPolicy::own_uid());
        let r = exchange(&path, "PUT /a/b?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("Server: Bulkhead API") || r.contains("server: Bulkhead API"), "{r}");
        assert!(r.ends_with("PUT /a/b hi"), "{r}");
        let big = "x".repeat(65);
        let r = exchange(
            &path,
            &format!("PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\nConnection: close\r\n\r\n{big}"),
        );
        assert!(r.starts_with("HTTP/1.1 400") && r.contains("larger than the limit of 64"), "{r}");
        drop(srv);
        assert!(!path.exists(), "the socket file is removed when the server stops");
    }

    #[test]
    fn silent_clients_do_not_hold_up_the_others() {
        let dir = tempfile::tempdir().expect("dir");
        let (_srv, path) = server(dir.path(), PeerPolicy::own_uid());
        // More than the server keeps: once idle long enough, the oldest silent ones are closed
        // to make room.
        let silent: Vec<UnixStream> =
            (0..MAX_CONNECTIONS + 2).map(|_| UnixStream::connect(&path).expect("connect")).collect();
        for _ in 0..3 {
            let r = exchange(&path, "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("GET /x "), "{r}");
        }
        // The first one was closed by the server: it reads end-of-file.
        let mut first = silent.into_iter().next().expect("one");
        first.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut b = [0u8; 1];
        assert_eq!(first.read(&mut b).expect("read"), 0);
    }

    #[test]
    fn a_peer_the_policy_does_not_allow_gets_403() {
        let dir = tempfile::tempdir().expect("dir");
        // A policy for some other uid: this (root or not) test process is allowed only if root.
        let me = nix::unistd::geteuid().as_raw();
        let (_srv, path) = server(dir.path(), PeerPolicy::uid(me.wrapping_add(1)));
        let r = exchange(&path, "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if me == 0 {
            assert!(r.starts_with("HTTP/1.1 200"), "root is always allowed: {r}");
        } else {
            assert!(r.starts_with("HTTP/1.1 403") && r.contains("API access refused"), "{r}");
        }
        assert!(PeerPolicy::uid(1000).allows(0) && PeerPolicy::uid(1000).allows(1000));
        assert!(!PeerPolicy::uid(1000).allows(1001));
    }
}
