//! The HTTP endpoint of `--metrics-listen`: `GET /metrics` answers the Prometheus
//! metrics of [`super::prometheus`] in the OpenMetrics text format.
//!
//! One thread accepts and answers one connection at a time: a scrape every few seconds
//! is all it serves. Each request is read for at most [`REQUEST_TIME`] and
//! [`MAX_REQUEST`] bytes; anything that is not a `GET` of `/metrics` gets an error
//! status, and the connection is closed after every answer. The thread is owned by a
//! [`MetricsServer`] and ends at its [`stop`](MetricsServer::stop) (or its drop), within
//! one request's bound (plus [`ACCEPT_POLL`] at most).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_netcmp::proxy::ProxyControl;
use prometheus_client::registry::Registry;

use super::event::Side;
use super::prometheus::{self, CONTENT_TYPE, MetricsHandle, SideMetrics};
use super::{ColoError, Result};

/// The most bytes of a request read (its line and headers).
pub const MAX_REQUEST: usize = 8192;
/// The longest a client may take to send its request, and the answer to go out.
pub const REQUEST_TIME: Duration = Duration::from_secs(2);
/// How often the idle accept loop looks at the stop flag (a connection wakes it at once).
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// What produces the metrics text at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// `GET /metrics`.
    Ok,
    /// Not an HTTP request line, or the headers never ended.
    BadRequest,
    /// Another path.
    NotFound,
    /// Another method.
    MethodNotAllowed,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
        }
    }
}

/// Routes a request by its head (request line and headers).
fn route(head: &[u8]) -> Status {
    let Some(line) = head
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
    else {
        return Status::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Status::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Status::BadRequest;
    }
    if method != "GET" {
        return Status::MethodNotAllowed;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/metrics" {
        Status::Ok
    } else {
        Status::NotFound
    }
}

/// Where the head of a request ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// Reads a request's head: until its blank line, [`MAX_REQUEST`] bytes, the client's
/// end, or [`REQUEST_TIME`]; `None` when it did not end in time or room.
fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_TIME;
    let mut buf = vec![0; MAX_REQUEST];
    let mut n = 0;
    while n < MAX_REQUEST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return None;
        }
        match s.read(&mut buf[n..]) {
            Ok(0) => return None,
            Ok(k) => {
                n += k;
                if let Some(end) = head_end(&buf[..n]) {
                    buf.truncate(end);
                    return Some(buf);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    None
}

/// Waits at most `timeout` for a connection to accept on `l`.
fn readable(l: &TcpListener, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, on the stack for the whole call; its descriptor is the
    // listener's, which `l` keeps open meanwhile.
    let n = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

/// Answers one connection; I/O errors only end it.
fn answer(mut s: TcpStream, render: &Render) {
    if s.set_nonblocking(false).is_err() || s.set_write_timeout(Some(REQUEST_TIME)).is_err() {
        return;
    }
    let status = read_head(&mut s).map_or(Status::BadRequest, |h| route(&h));
    let (body, content_type) = match status {
        Status::Ok => (render(), CONTENT_TYPE),
        other => (format!("{}\n", other.line()), "text/plain; charset=utf-8"),
    };
    let allow = if status == Status::MethodNotAllowed {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        status.line(),
        body.len()
    );
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()));
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// The metrics endpoint: a listener and the thread that answers on it.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Listens on `addr` (host:port; port 0 picks one) and answers `GET /metrics` with
    /// what `render` gives at each request.
    ///
    /// # Errors
    /// [`ColoError::Listen`] when the address cannot be bound, [`ColoError::Io`] or
    /// [`ColoError::Spawn`] when the listener or its thread cannot be set up.
    pub fn start(addr: &str, render: Render) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|source| ColoError::Listen {
            what: "metrics scrapes",
            addr: addr.to_string(),
            source,
        })?;
        let bound = listener
            .local_addr()
            .map_err(ColoError::io("read the metrics listener's address"))?;
        listener
            .set_nonblocking(true)
            .map_err(ColoError::io("make the metrics listener non-blocking"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("colo-metrics".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    if !readable(&listener, ACCEPT_POLL) {
                        continue;
                    }
                    match listener.accept() {
                        Ok((s, _)) => answer(s, &render),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => {
                            // E.g. out of descriptors: wait instead of spinning.
                            tracing::debug!(error = %e, "metrics accept failed");
                            std::thread::sleep(ACCEPT_POLL);
                        }
                    }
                }
            })
            .map_err(ColoError::spawn("metrics server"))?;
        tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
        Ok(Self {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops answering and waits for the thread (at most one request's
    /// [`REQUEST_TIME`] twice, for reading it and writing the answer).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    /// Stops the thread too when the server is dropped without [`stop`](Self::stop)
    /// (an early return), so that it never outlives its owner.
    fn drop(&mut self) {
        self.halt();
    }
}

/// A side's metrics and, with `--metrics-listen`, the server that exposes them.
#[derive(Debug)]
pub struct SideEndpoint {
    metrics: MetricsHandle,
    server: Option<MetricsServer>,
}

impl SideEndpoint {
    /// The metrics of `side`, served at `addr` if one is given; without one, the handle
    /// records nothing.
    ///
    /// # Errors
    /// As for [`MetricsServer::start`].
    pub fn serve(addr: Option<&str>, side: Side) -> Result<Self> {
        let Some(addr) = addr else {
            return Ok(Self {
                metrics: MetricsHandle::none(),
                server: None,
            });
        };
        let m = Arc::new(SideMetrics::new(side));
        let r = Arc::clone(&m);
        let server = MetricsServer::start(addr, Arc::new(move || r.render()))?;
        Ok(Self {
            metrics: MetricsHandle::new(m),
            server: Some(server),
        })
    }

    /// The handle the side records with.
    pub fn metrics(&self) -> MetricsHandle {
        self.metrics.clone()
    }

    /// Stops the server, if there is one.
    pub fn stop(self) {
        if let Some(s) = self.server {
            s.stop();
        }
    }
}

/// The proxy's metrics (`colo proxy`, and `colo pair`'s proxy), served at an address
/// bound before the proxy starts (a bad address fails at once): until
/// [`attach`](Self::attach) a scrape finds no families.
#[derive(Debug)]
pub struct ProxyEndpoint {
    registry: Arc<OnceLock<Registry>>,
    server: Option<MetricsServer>,
}

impl ProxyEndpoint {
    /// Serves at `addr`, if one is given.
    ///
    /// # Errors
    /// As for [`MetricsServer::start`].
    pub fn serve(addr: Option<&str>) -> Result<Self> {
        let registry = Arc::new(OnceLock::<Registry>::new());
        let server = match addr {
            Some(addr) => {
                let r = Arc::clone(&registry);
                let render: Render = Arc::new(move || {
                    r.get()
                        .map_or_else(|| "# EOF\n".to_string(), prometheus::render)
                });
                Some(MetricsServer::start(addr, render)?)
            }
            None => None,
        };
        Ok(Self { registry, server })
    }

    /// Reads the counters of the running proxy behind `control` from now on (the first
    /// call only counts).
    pub fn attach(&self, control: ProxyControl) {
        if self.server.is_some() {
            let _ = self.registry.set(prometheus::proxy_registry(control));
        }
    }

    /// Stops the server, if there is one.
    pub fn stop(self) {
        if let Some(s) = self.server {
            s.stop();
        }
    }
}

/// `addr` (host:port) with its port raised by `by`: `colo pair`'s secondary and proxy
/// endpoints beside the primary's. `None` when it is not host:port or the port overflows.
pub fn port_after(addr: &str, by: u16) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?.checked_add(by)?;
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "# TYPE x counter\nx_total 7\n# EOF\n";

    fn server() -> MetricsServer {
        MetricsServer::start("127.0.0.1:0", Arc::new(|| BODY.to_string())).unwrap()
    }

    /// Sends `req`, reads the whole answer (the server closes after it).
    fn exchange(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn a_get_of_metrics_answers_the_rendered_text_and_anything_else_an_error() {
        let srv = server();
        let a = srv.addr;
        let ok = exchange(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{ok}"
        );
        assert!(
            ok.contains(&format!("Content-Length: {}\r\n", BODY.len())),
            "{ok}"
        );
        assert!(ok.ends_with(&format!("\r\n\r\n{BODY}")), "{ok}");
        // A query string is ignored; a bare-LF client is answered too.
        let q = exchange(a, b"GET /metrics?name[]=x HTTP/1.0\n\n");
        assert!(q.starts_with("HTTP/1.1 200 OK\r\n"), "{q}");

        let nf = exchange(a, b"GET / HTTP/1.1\r\n\r\n");
        assert!(nf.starts_with("HTTP/1.1 404 Not Found\r\n"), "{nf}");
        let nf = exchange(a, b"GET /metricsx HTTP/1.1\r\n\r\n");
        assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
        let post = exchange(a, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET\r\n"), "{post}");

        for garbage in [
            &b"\x00\xff\xfe\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SMTP/1.0\r\n\r\n",
        ] {
            let r = exchange(a, garbage);
            assert!(r.starts_with("HTTP/1.1 400 "), "{garbage:?}: {r}");
        }
        // Headers that never end within the limit.
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST * 2));
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may close while this is still being written: only its answer counts.
        let _ = s.write_all(&huge);
        let mut r = Vec::new();
        let _ = s.read_to_end(&mut r);
        assert!(
            r.starts_with(b"HTTP/1.1 400 "),
            "{}",
            String::from_utf8_lossy(&r)
        );
        // A client that connects and leaves without a word.
        drop(TcpStream::connect(a).unwrap());

        // Still serving after all that.
        assert!(exchange(a, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
        srv.stop();
        assert!(
            TcpStream::connect(a).is_err(),
            "the listener is closed with the server"
        );
    }

    #[test]
    fn a_silent_client_costs_the_server_at_most_its_time_limit() {
        let srv = server();
        let a = srv.addr;
        let mut silent = TcpStream::connect(a).unwrap();
        silent.set_read_timeout(Some(REQUEST_TIME * 5)).unwrap();
        let t = Instant::now();
        let mut r = String::new();
        let _ = silent.read_to_string(&mut r);
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        assert!(t.elapsed() < REQUEST_TIME * 4, "{:?}", t.elapsed());
        // Stopping while a client is silent waits for it only within the bound.
        let _silent_again = TcpStream::connect(a).unwrap();
        std::thread::sleep(ACCEPT_POLL * 3);
        let t = Instant::now();
        srv.stop();
        assert!(t.elapsed() < REQUEST_TIME * 4, "{:?}", t.elapsed());
    }

    #[test]
    fn pair_ports_follow_the_given_one() {
        assert_eq!(
            port_after("127.0.0.1:9100", 1).as_deref(),
            Some("127.0.0.1:9101")
        );
        assert_eq!(port_after("[::1]:9100", 2).as_deref(), Some("[::1]:9102"));
        assert_eq!(port_after("host:65535", 1), None);
        assert_eq!(port_after("no-port", 1), None);
    }
}
