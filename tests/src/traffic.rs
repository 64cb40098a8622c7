//! Real TCP traffic for the tests, the demo and the benchmarks: a server that says who it is
//! and echoes, and a bounded client. Every loop here is bounded in count and time.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long any single socket operation may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening socket inside a namespace and the thread that accepts on it, handing each
/// connection, with the peer's address and the server's deadline, to `on_accept`. Stopped on
/// drop.
pub(crate) struct Listening {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Listening {
    /// Listens on `addr` inside `ns` (bound before this returns) for at most `lifetime`.
    #[track_caller]
    pub(crate) fn start(
        ns: &Netns,
        addr: SocketAddrV4,
        lifetime: Duration,
        mut on_accept: impl FnMut(TcpStream, SocketAddr, Instant) + Send + 'static,
    ) -> Self {
        let listener = ns.run(move || TcpListener::bind(addr));
        let listener = listener.unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let deadline = Instant::now() + lifetime;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((conn, from)) => on_accept(conn, from, deadline),
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Listening {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server inside a namespace: to each connection it first sends its name and a newline,
/// then echoes everything back until the peer closes. Stopped on drop.
pub struct EchoServer {
    pub addr: SocketAddrV4,
    _listening: Listening,
}

impl EchoServer {
    /// Starts listening on `addr` inside `ns` (bound before this returns) and serves for at
    /// most `lifetime`.
    #[track_caller]
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str, lifetime: Duration) -> Self {
        let name = format!("{name}\n").into_bytes();
        let listening = Listening::start(ns, addr, lifetime, move |conn, _, deadline| {
            let name = name.clone();
            thread::spawn(move || serve(conn, &name, deadline));
        });
        EchoServer {
            addr,
            _listening: listening,
        }
    }
}

fn serve(mut conn: TcpStream, name: &[u8], deadline: Instant) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    if conn.write_all(name).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// A connection to an [`EchoServer`] (possibly through the gateway).
pub struct EchoClient {
    reader: BufReader<TcpStream>,
    /// The name the server announced.
    pub server: String,
}

impl EchoClient {
    /// Connects from a socket created inside `ns` and reads the server's name.
    pub fn connect(ns: &Netns, to: SocketAddr) -> std::io::Result<Self> {
        let stream = ns.run(move || TcpStream::connect_timeout(&to, IO_TIMEOUT))?;
        Self::from_stream(stream)
    }

    /// [`EchoClient::connect`] giving up after `timeout`.
    pub fn connect_within(ns: &Netns, to: SocketAddr, timeout: Duration) -> std::io::Result<Self> {
        let stream = ns.run(move || TcpStream::connect_timeout(&to, timeout))?;
        Self::from_stream(stream)
    }

    /// The connection's own address (the client's side).
    pub fn local_addr(&self) -> SocketAddr {
        self.reader
            .get_ref()
            .local_addr()
            .expect("a connected socket")
    }

    /// Sets how long a read or write may block.
    pub fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        let s = self.reader.get_ref();
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))
    }

    /// Connects from `from` (a bound source address and port) inside `ns`.
    pub fn connect_from(ns: &Netns, from: SocketAddr, to: SocketAddr) -> std::io::Result<Self> {
        let stream = ns.run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&from.into())?;
            s.connect_timeout(&to.into(), IO_TIMEOUT)?;
            Ok::<_, std::io::Error>(TcpStream::from(s))
        })?;
        Self::from_stream(stream)
    }

    /// Opens `n` connections at once from inside `ns` (all open before any is used).
    pub fn connect_many(ns: &Netns, to: SocketAddr, n: usize) -> std::io::Result<Vec<Self>> {
        let streams = ns.run(move || {
            (0..n)
                .map(|_| TcpStream::connect_timeout(&to, IO_TIMEOUT))
                .collect::<std::io::Result<Vec<_>>>()
        })?;
        streams.into_iter().map(Self::from_stream).collect()
    }

    /// Wraps a connected stream and reads the server's name.
    pub fn from_stream(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream);
        let mut server = String::new();
        reader.read_line(&mut server)?;
        if !server.ends_with('\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed before saying its name",
            ));
        }
        server.pop();
        Ok(EchoClient { reader, server })
    }

    /// Sends `data` and reads it back, concurrently (so large payloads do not deadlock on
    /// full socket buffers); returns an error if the echo differs.
    pub fn echo(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut writer = self.reader.get_ref().try_clone()?;
        let echoed = thread::scope(|s| {
            let sender = s.spawn(|| writer.write_all(data));
            let mut echoed = vec![0u8; data.len()];
            let read = self.reader.read_exact(&mut echoed);
            let sent = sender.join().expect("sender thread");
            sent.and(read).map(|()| echoed)
        })?;
        if echoed != data {
            let at = echoed.iter().zip(data).position(|(a, b)| a != b);
            return Err(std::io::Error::other(format!(
                "echo differs from what was sent (first difference at byte {at:?})"
            )));
        }
        Ok(())
    }
}

/// A TCP server inside a namespace that hands each connection from `peer` (the gateway's SNAT
/// address) to the test as it is, so that the test holds the backend's end of a connection:
/// it can block in `read()` there, or see `ECONNRESET`. Connections from anywhere else (the
/// health checks) are closed at once. Stopped on drop.
pub struct Acceptor {
    pub addr: SocketAddrV4,
    accepted: mpsc::Receiver<TcpStream>,
    _listening: Listening,
}

impl Acceptor {
    /// Starts listening on `addr` inside `ns` (bound before this returns) and accepts for at
    /// most `lifetime`.
    #[track_caller]
    pub fn start(ns: &Netns, addr: SocketAddrV4, peer: Ipv4Addr, lifetime: Duration) -> Self {
        let (tx, accepted) = mpsc::channel();
        let listening = Listening::start(ns, addr, lifetime, move |conn, from, _| {
            let from_peer = matches!(from, SocketAddr::V4(a) if *a.ip() == peer);
            if from_peer && conn.set_nonblocking(false).is_ok() {
                // The test may have stopped waiting: then the connection just closes.
                let _ = tx.send(conn);
            }
        });
        Acceptor {
            addr,
            accepted,
            _listening: listening,
        }
    }

    /// The next connection accepted from the peer, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<TcpStream> {
        self.accepted.recv_timeout(timeout).ok()
    }
}

/// One connection through the gateway with both of its ends in the test's hands: the
/// client's socket and the backend's (from an [`Acceptor`]). Every read and write of either
/// gives up after [`Pair::TIMEOUT`] unless told otherwise.
pub struct Pair {
    pub client: TcpStream,
    pub backend: TcpStream,
}

impl Pair {
    /// How long a read or write of either end may block.
    pub const TIMEOUT: Duration = Duration::from_secs(2);

    /// Connects from inside `ns` to `to` (giving up after `timeout`) and takes the backend's
    /// end from `acceptor`.
    pub fn open(
        ns: &Netns,
        to: SocketAddr,
        acceptor: &Acceptor,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        let client = ns.run(move || TcpStream::connect_timeout(&to, timeout))?;
        let backend = acceptor.next(IO_TIMEOUT).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the backend accepted no connection from the gateway",
            )
        })?;
        for s in [&client, &backend] {
            s.set_read_timeout(Some(Self::TIMEOUT))?;
            s.set_write_timeout(Some(Self::TIMEOUT))?;
            s.set_nodelay(true)?;
        }
        Ok(Pair { client, backend })
    }

    /// The client's address (as the client sees it).
    pub fn client_addr(&self) -> SocketAddrV4 {
        match self.client.local_addr().expect("a connected socket") {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("an IPv6 client address {a}"),
        }
    }

    /// The gateway's SNAT address and port (as the backend sees its peer).
    pub fn snat_addr(&self) -> SocketAddrV4 {
        match self.backend.peer_addr().expect("a connected socket") {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("an IPv6 peer {a}"),
        }
    }

    /// One message each way, `round` making it unique: the client's reaches the backend,
    /// then the backend's reaches the client. An error says which leg failed.
    pub fn exchange(&mut self, round: u32) -> std::io::Result<()> {
        let message = |from: &str, to: &str| format!("{from}->{to} {round:08}").into_bytes();
        carry(
            &self.client,
            &self.backend,
            &message("client", "backend"),
            "client",
            "backend",
        )?;
        carry(
            &self.backend,
            &self.client,
            &message("backend", "client"),
            "backend",
            "client",
        )
    }
}

impl Pair {
    /// One end's FIN: the backend's (`backend`) or the client's end shuts down its writing
    /// side, and the other end reads the end of the stream. An error says what failed.
    pub fn fin(&self, backend: bool) -> std::io::Result<()> {
        let (from, mut to, name) = if backend {
            (&self.backend, &self.client, "client")
        } else {
            (&self.client, &self.backend, "backend")
        };
        from.shutdown(Shutdown::Write)?;
        let mut buf = [0u8; 16];
        match to.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => Err(std::io::Error::other(format!(
                "the {name} read {n} bytes instead of a FIN"
            ))),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("the {name} reading the FIN: {e}"),
            )),
        }
    }

    /// Closes the connection with a FIN each way, the backend's first (`backend_first`) or
    /// the client's, each read by the other end; both sockets go.
    pub fn close(self, backend_first: bool) -> std::io::Result<()> {
        self.fin(backend_first)?;
        self.fin(!backend_first)
    }
}

/// Writes `message` on `from` and reads it back whole on `to`; an error names the side and
/// what failed.
fn carry(
    mut from: &TcpStream,
    mut to: &TcpStream,
    message: &[u8],
    from_name: &str,
    to_name: &str,
) -> std::io::Result<()> {
    let err =
        |what: String, e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    from.write_all(message)
        .map_err(|e| err(format!("{from_name} write"), e))?;
    let mut got = vec![0u8; message.len()];
    to.read_exact(&mut got)
        .map_err(|e| err(format!("{to_name} read"), e))?;
    if got != message {
        return Err(std::io::Error::other(format!(
            "{to_name} read something else than {from_name} wrote"
        )));
    }
    Ok(())
}

/// Connections started from inside a namespace without waiting for them (non-blocking
/// connects): each one completes its handshake or stays in SYN_SENT, retransmitting its SYN,
/// until it is dropped (which sends nothing). The test looks at which completed, never at how
/// long they took.
pub struct Connecting {
    streams: Vec<TcpStream>,
}

impl Connecting {
    /// Starts `n` connects to `to` from sockets created inside `ns`.
    pub fn start(ns: &Netns, to: SocketAddr, n: usize) -> std::io::Result<Self> {
        let streams = ns.run(move || {
            (0..n)
                .map(|_| {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    s.set_nonblocking(true)?;
                    match s.connect(&to.into()) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                        Err(e) => return Err(e),
                    }
                    Ok(TcpStream::from(s))
                })
                .collect::<std::io::Result<Vec<_>>>()
        })?;
        Ok(Connecting { streams })
    }

    /// How many connects were started.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// How many have completed their handshake.
    pub fn connected(&self) -> usize {
        self.streams.iter().filter(|s| is_connected(s)).count()
    }

    /// How many are still trying: in SYN_SENT, neither connected nor failed (a reset, an
    /// ICMP error or too many retransmissions close the socket).
    pub fn trying(&self) -> usize {
        self.streams
            .iter()
            .filter(|s| tcp_state(s) == Some(TCP_SYN_SENT))
            .count()
    }

    /// Splits them into those connected (blocking again, with [`IO_TIMEOUT`] on reads and
    /// writes) and those still trying.
    pub fn split(self) -> std::io::Result<(Vec<TcpStream>, Vec<TcpStream>)> {
        let (done, pending): (Vec<_>, Vec<_>) = self.streams.into_iter().partition(is_connected);
        for s in &done {
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
        }
        Ok((done, pending))
    }
}

/// Whether a (non-blocking) socket's connect has completed: it has a peer.
pub fn is_connected(s: &TcpStream) -> bool {
    s.peer_addr().is_ok()
}

/// `TCP_SYN_SENT` of the kernel's TCP states (`include/net/tcp_states.h`).
pub const TCP_SYN_SENT: u8 = 2;

/// The kernel's TCP state of a socket (`tcpi_state` of `TCP_INFO`), if it can be read.
pub fn tcp_state(s: &TcpStream) -> Option<u8> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: plain data, all zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(info.tcpi_state)
}

/// A deterministic payload of `len` bytes (a simple LCG, so corruption shows anywhere).
pub fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (x >> 16) as u8
        })
        .collect()
}

/// `ip:port` as a socket address.
pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// One HTTP/1.0 exchange with `addr`, from the calling thread's namespace: `request` (its head,
/// ending with the blank line) sent, the whole answer read until the server closes, each step
/// within `timeout`. The answer's head and body, split at the blank line.
pub fn http_exchange(
    addr: SocketAddr,
    request: &str,
    timeout: Duration,
) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not HTTP: {answer:?}"),
        )
    })?;
    Ok((head.to_owned(), body.to_owned()))
}
