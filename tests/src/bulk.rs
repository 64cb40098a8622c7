//! Bulk transfers that must go byte-exact or say how far they got: a server that sends a
//! deterministic payload of the length asked ([`Direction::Download`]) or takes one and
//! answers its digest ([`Direction::Upload`]), and a client bounded by a deadline. A transfer
//! that stalls (full-size segments lost for good on a path whose MTU nobody learnt) ends at the
//! deadline with what had moved. Every loop here is bounded in count and time.
//!
//! The protocol: the client sends 13 bytes, the operation (`D` or `U`), the length (u64) and
//! the payload's seed (u32), big-endian; for `D` the server sends [`payload`]`(len, seed)` and
//! closes; for `U` it reads `len` bytes and answers their [`digest`] and how many it read (two
//! u64). A connection that sends no request (a health check) is closed.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use crate::{
    netns::Netns,
    traffic::{IO_TIMEOUT, Listening, payload},
};

/// The longest transfer the server takes (it holds the payload in memory).
pub const MAX_LEN: usize = 64 << 20;
/// How long a connect may take, within a transfer's deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CHUNK: usize = 64 * 1024;
const REQUEST_LEN: usize = 13;

/// Which way the payload goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the server to the client.
    Download,
    /// From the client to the server.
    Upload,
}

impl Direction {
    fn op(self) -> u8 {
        match self {
            Direction::Download => b'D',
            Direction::Upload => b'U',
        }
    }
}

/// FNV-1a (64 bits) of `data`.
pub fn digest(data: &[u8]) -> u64 {
    fnv(0xcbf2_9ce4_8422_2325, data)
}

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The server: a thread per connection, for at most its lifetime. Stopped on drop.
pub struct BulkServer {
    pub addr: SocketAddrV4,
    _listening: Listening,
}

impl BulkServer {
    /// Starts listening on `addr` inside `ns` (bound before this returns) and serves for at
    /// most `lifetime`.
    #[track_caller]
    pub fn start(ns: &Netns, addr: SocketAddrV4, lifetime: Duration) -> Self {
        let listening = Listening::start(ns, addr, lifetime, |conn, _, deadline| {
            thread::spawn(move || {
                let _ = serve(conn, deadline);
            });
        });
        BulkServer {
            addr,
            _listening: listening,
        }
    }
}

fn serve(mut conn: TcpStream, deadline: Instant) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = [0u8; REQUEST_LEN];
    conn.read_exact(&mut request)?;
    let len = u64::from_be_bytes(request[1..9].try_into().expect("8 bytes"));
    let seed = u32::from_be_bytes(request[9..13].try_into().expect("4 bytes"));
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_LEN)
        .ok_or_else(|| std::io::Error::other(format!("{len} bytes asked")))?;
    match request[0] {
        b'D' => {
            for chunk in payload(len, seed).chunks(CHUNK) {
                if Instant::now() >= deadline {
                    return Err(ErrorKind::TimedOut.into());
                }
                conn.write_all(chunk)?;
            }
            conn.shutdown(Shutdown::Write)
        }
        b'U' => {
            let (mut h, mut got) = (digest(&[]), 0);
            let mut buf = vec![0u8; CHUNK];
            while got < len && Instant::now() < deadline {
                let n = conn.read(&mut buf[..CHUNK.min(len - got)])?;
                if n == 0 {
                    break;
                }
                h = fnv(h, &buf[..n]);
                got += n;
            }
            let mut answer = h.to_be_bytes().to_vec();
            answer.extend((got as u64).to_be_bytes());
            conn.write_all(&answer)
        }
        op => Err(std::io::Error::other(format!("operation {op}"))),
    }
}

/// How a transfer went.
#[derive(Debug)]
pub struct Transfer {
    pub direction: Direction,
    pub len: usize,
    /// Bytes that moved: read and checked (a download), or written into the socket (an
    /// upload: queued, not necessarily delivered).
    pub moved: usize,
    pub took: Duration,
    /// Whether the connection was established.
    pub connected: bool,
    /// Why it did not complete byte-exact (`None`: it did).
    pub error: Option<std::io::Error>,
}

impl Transfer {
    /// Whether every byte arrived as sent.
    pub fn completed(&self) -> bool {
        self.error.is_none()
    }

    /// Whether it was connected and then ran out of time: no error but the deadline.
    pub fn stalled(&self) -> bool {
        self.connected
            && self
                .error
                .as_ref()
                .is_some_and(|e| e.kind() == ErrorKind::TimedOut)
    }
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.direction {
            Direction::Download => "download",
            Direction::Upload => "upload",
        };
        let secs = self.took.as_secs_f64();
        match &self.error {
            None => write!(f, "{what} of {} bytes: byte-exact in {secs:.2} s", self.len),
            Some(e) => write!(
                f,
                "{what} of {} bytes: {} moved in {secs:.2} s, then {e}",
                self.len, self.moved
            ),
        }
    }
}

/// A transfer of `len` bytes of `payload(len, seed)` between a socket created inside `ns` and
/// the [`BulkServer`] at `to`, given up at `deadline` after it starts.
pub fn transfer(
    ns: &Netns,
    to: SocketAddr,
    direction: Direction,
    len: usize,
    seed: u32,
    deadline: Duration,
) -> Transfer {
    assert!(len <= MAX_LEN, "{len} bytes: at most {MAX_LEN}");
    let start = Instant::now();
    let end = start + deadline;
    let (mut moved, mut connected) = (0, false);
    let connect = deadline.min(CONNECT_TIMEOUT);
    let result = ns
        .run(move || TcpStream::connect_timeout(&to, connect))
        .map_err(|e| std::io::Error::new(e.kind(), format!("connect: {e}")))
        .and_then(|mut s| {
            connected = true;
            let mut request = vec![direction.op()];
            request.extend((len as u64).to_be_bytes());
            request.extend(seed.to_be_bytes());
            s.set_write_timeout(Some(left(end)?))?;
            s.write_all(&request)?;
            let data = payload(len, seed);
            match direction {
                Direction::Download => download(&mut s, &data, end, &mut moved),
                Direction::Upload => upload(&mut s, &data, end, &mut moved),
            }
        });
    Transfer {
        direction,
        len,
        moved,
        took: start.elapsed(),
        connected,
        error: result.err(),
    }
}

/// What is left until `end`, or a stall's error once it has passed.
fn left(end: Instant) -> std::io::Result<Duration> {
    let left = end.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "stalled: the deadline passed",
        ));
    }
    Ok(left)
}

/// A socket timeout's error (which only the deadline sets) said as a stall; any other error
/// as it is.
fn stalled(e: std::io::Error, what: &str) -> std::io::Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => std::io::Error::new(
            ErrorKind::TimedOut,
            format!("stalled: nothing more {what} until the deadline"),
        ),
        _ => e,
    }
}

fn download(
    s: &mut TcpStream,
    data: &[u8],
    end: Instant,
    moved: &mut usize,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    while *moved < data.len() {
        s.set_read_timeout(Some(left(end)?))?;
        let n = s.read(&mut buf).map_err(|e| stalled(e, "read"))?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the server closed early",
            ));
        }
        let expected = &data[*moved..];
        if n > expected.len() || buf[..n] != expected[..n] {
            let at = buf[..n].iter().zip(expected).position(|(a, b)| a != b);
            return Err(std::io::Error::other(format!(
                "the data differs from what was sent at byte {}",
                *moved + at.unwrap_or(expected.len())
            )));
        }
        *moved += n;
    }
    Ok(())
}

fn upload(s: &mut TcpStream, data: &[u8], end: Instant, moved: &mut usize) -> std::io::Result<()> {
    while *moved < data.len() {
        s.set_write_timeout(Some(left(end)?))?;
        let chunk = &data[*moved..data.len().min(*moved + CHUNK)];
        match s.write(chunk).map_err(|e| stalled(e, "written"))? {
            0 => return Err(ErrorKind::WriteZero.into()),
            n => *moved += n,
        }
    }
    let mut answer = [0u8; 16];
    let mut got = 0;
    while got < answer.len() {
        s.set_read_timeout(Some(left(end)?))?;
        match s.read(&mut answer[got..]).map_err(|e| {
            stalled(
                e,
                "read (all was written; the server's digest did not come)",
            )
        })? {
            0 => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the server closed without its digest",
                ));
            }
            n => got += n,
        }
    }
    let (h, n) = answer.split_at(8);
    let h = u64::from_be_bytes(h.try_into().expect("8 bytes"));
    let n = u64::from_be_bytes(n.try_into().expect("8 bytes"));
    if n != data.len() as u64 || h != digest(data) {
        return Err(std::io::Error::other(format!(
            "the server read {n} bytes of digest {h:016x}, not {} of {:016x}",
            data.len(),
            digest(data)
        )));
    }
    Ok(())
}
