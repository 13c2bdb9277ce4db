//! A small synchronous RESP2 client for the Redis engine: commands are arrays of bulk strings,
//! replies are parsed into [`Reply`]. [`Pool`] keeps a few idle connections and drops any that
//! failed or that the server closed, so a restarted Redis is reconnected to on the next call.
//!
//! Every I/O failure (refused, reset, timed out, closed) is [`StoreError::Unavailable`]; an
//! error reply from Redis is [`StoreError::Other`], except the ones that mean "try later"
//! (`LOADING`, `BUSY`, `MASTERDOWN`, `TRYAGAIN`, auth failures), which are `Unavailable` too,
//! and the ones that mean "no room" (`MISCONF`: it cannot persist; `OOM`), which are
//! [`StoreError::NoSpace`].

use crate::{Result, StoreError};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How long connecting may take before the store is reported unavailable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one reply may take. Large batches (a 100,000-job tree) run one script of a few
/// hundred milliseconds; a Redis that answers nothing for this long counts as unavailable.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How many idle connections a pool keeps; more are opened under load and closed afterwards.
const POOL_IDLE: usize = 8;
/// The longest bulk string or array accepted from the server (a sanity bound, not a limit of
/// what muster stores).
const MAX_LEN: i64 = 1 << 30;

/// One reply of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    /// `None` is the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` is the nil array.
    Array(Option<Vec<Reply>>),
}

fn bad_reply(what: &str, r: &Reply) -> StoreError {
    StoreError::Other(format!("unexpected Redis reply to {what}: {r:?}"))
}

impl Reply {
    /// The reply as a Redis error turned into a [`StoreError`], or itself.
    pub(crate) fn check(self) -> Result<Reply> {
        match self {
            Reply::Error(e) => Err(redis_error(&e)),
            r => Ok(r),
        }
    }

    pub(crate) fn int(self) -> Result<i64> {
        match self.check()? {
            Reply::Int(n) => Ok(n),
            r => Err(bad_reply("an integer command", &r)),
        }
    }

    /// A bulk string (or status) as UTF-8 text; `None` for nil.
    pub(crate) fn opt_string(self) -> Result<Option<String>> {
        match self.check()? {
            Reply::Bulk(None) => Ok(None),
            Reply::Bulk(Some(b)) => String::from_utf8(b)
                .map(Some)
                .map_err(|e| StoreError::Other(format!("non-UTF-8 value in Redis: {e}"))),
            Reply::Status(s) => Ok(Some(s)),
            r => Err(bad_reply("a string command", &r)),
        }
    }

    /// An array's elements; nil is empty.
    pub(crate) fn array(self) -> Result<Vec<Reply>> {
        match self.check()? {
            Reply::Array(a) => Ok(a.unwrap_or_default()),
            r => Err(bad_reply("an array command", &r)),
        }
    }

    /// An array of bulk strings (nil elements kept as `None`).
    pub(crate) fn strings(self) -> Result<Vec<Option<String>>> {
        self.array()?.into_iter().map(Reply::opt_string).collect()
    }
}

/// The store error an error reply means.
pub(crate) fn redis_error(msg: &str) -> StoreError {
    let code = msg.split(' ').next().unwrap_or("");
    match code {
        "LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "NOAUTH" | "WRONGPASS" | "CLUSTERDOWN" => {
            StoreError::Unavailable(format!("Redis: {msg}"))
        }
        // It cannot persist writes (its disk is full, say) or is at `maxmemory`: no room.
        "MISCONF" | "OOM" => StoreError::NoSpace(format!("Redis: {msg}")),
        _ => StoreError::Other(format!("Redis: {msg}")),
    }
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Unavailable(format!("Redis connection: {e}"))
}

/// Where and how to connect, from a `redis://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub host: String,
    pub port: u16,
    pub db: u32,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Target {
    /// Parses `redis://[[USER]:PASS@]HOST[:PORT][/DB]`.
    pub(crate) fn parse(url: &str) -> Result<Target> {
        let invalid = |why: &str| {
            StoreError::Invalid(format!(
                "bad Redis URL {url:?}: {why} (use redis://[:PASSWORD@]HOST[:PORT][/DB])"
            ))
        };
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| invalid("it must start with redis://"))?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => {
                let (u, p) = a.split_once(':').unwrap_or(("", a));
                let u = (!u.is_empty()).then(|| percent_decode(u));
                (u, Some(percent_decode(p)))
            }
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse::<u32>()
                    .map_err(|_| invalid("the database must be a number"))?,
            ),
            None => (hostpart, 0),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // [IPv6]:port
            let (h, after) = h.split_once(']').ok_or_else(|| invalid("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| invalid("bad port"))?,
                None if after.is_empty() => 6379,
                None => return Err(invalid("bad port")),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| invalid("bad port"))?),
                None => (hostport.to_string(), 6379),
            }
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        Ok(Target {
            host,
            port,
            db,
            user,
            password,
        })
    }

    /// `host:port`, for messages.
    pub(crate) fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends one command (an array of bulk strings) to `buf`.
pub(crate) fn encode<A: AsRef<[u8]>>(buf: &mut Vec<u8>, args: &[A]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

/// One connection to Redis.
pub(crate) struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// Commands written but not sent yet.
    out: Vec<u8>,
    /// Replies still to read for what was sent.
    pending: usize,
}

impl Conn {
    /// Connects, authenticates and selects the database.
    pub(crate) fn open(t: &Target) -> Result<Conn> {
        let addrs = (t.host.as_str(), t.port)
            .to_socket_addrs()
            .map_err(|e| StoreError::Unavailable(format!("Redis at {}: {e}", t.addr())))?;
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            StoreError::Unavailable(format!(
                "cannot connect to Redis at {}: {}",
                t.addr(),
                last.map(|e| e.to_string())
                    .unwrap_or_else(|| "no address".into())
            ))
        })?;
        let setup = |s: &TcpStream| -> io::Result<TcpStream> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.try_clone()
        };
        let writer = setup(&stream).map_err(io_err)?;
        let mut c = Conn {
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
            out: Vec::with_capacity(4096),
            pending: 0,
        };
        if let Some(p) = &t.password {
            let r = match &t.user {
                Some(u) => c.call(&["AUTH", u.as_str(), p.as_str()])?,
                None => c.call(&["AUTH", p.as_str()])?,
            };
            if let Reply::Error(e) = r {
                return Err(StoreError::Unavailable(format!(
                    "Redis at {} refused the password: {e}",
                    t.addr()
                )));
            }
        }
        if t.db != 0 {
            c.call(&["SELECT", &t.db.to_string()])?.check()?;
        }
        Ok(c)
    }

    /// Queues a command; [`Conn::flush`] sends it.
    pub(crate) fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        encode(&mut self.out, args);
        self.pending += 1;
    }

    /// Sends every queued command.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).map_err(io_err)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Sends what is queued and reads one reply.
    pub(crate) fn recv(&mut self) -> Result<Reply> {
        self.flush()?;
        let r = read_reply(&mut self.reader).map_err(io_err)?;
        self.pending = self.pending.saturating_sub(1);
        Ok(r)
    }

    /// Sends what is queued and reads all outstanding replies (a pipeline), in order.
    pub(crate) fn recv_all(&mut self) -> Result<Vec<Reply>> {
        self.flush()?;
        let mut out = Vec::with_capacity(self.pending);
        while self.pending > 0 {
            out.push(read_reply(&mut self.reader).map_err(io_err)?);
            self.pending -= 1;
        }
        Ok(out)
    }

    /// One command, one reply (the reply may be an error reply).
    pub(crate) fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Reply> {
        // A big command (a 100,000-job tree is tens of MB, and the script that stores it runs
        // as long) gets time in proportion: 1 s more per MB, on a busy machine too.
        let bytes: usize = args.iter().map(|a| a.as_ref().len()).sum();
        let big = bytes > 1 << 20;
        if big {
            let t = IO_TIMEOUT + Duration::from_millis(bytes as u64 / 1000);
            let _ = self.reader.get_ref().set_read_timeout(Some(t));
            let _ = self.writer.set_write_timeout(Some(t));
        }
        self.send(args);
        let r = self.recv();
        if big {
            let _ = self.reader.get_ref().set_read_timeout(Some(IO_TIMEOUT));
            let _ = self.writer.set_write_timeout(Some(IO_TIMEOUT));
        }
        r
    }

    /// Whether the connection is still usable: nothing unread and not closed by the server
    /// (a restarted Redis closed every old connection).
    fn healthy(&self) -> bool {
        if self.pending != 0 || !self.out.is_empty() || !self.reader.buffer().is_empty() {
            return false;
        }
        let s = self.reader.get_ref();
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let alive = matches!(s.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        alive && s.set_nonblocking(false).is_ok()
    }

    /// Sets the read timeout (`None`: block).
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        self.reader.get_ref().set_read_timeout(t).map_err(io_err)
    }

    /// Waits for the next byte of a reply. `Ok(false)` when the read timeout passed with
    /// nothing received (the stream is still in step).
    pub(crate) fn wait_readable(&mut self) -> Result<bool> {
        match self.reader.fill_buf() {
            Ok([]) => Err(StoreError::Unavailable(
                "Redis closed the connection".into(),
            )),
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// Reads one reply without sending anything (pub/sub pushes).
    pub(crate) fn read_push(&mut self) -> Result<Reply> {
        read_reply(&mut self.reader).map_err(io_err)
    }

    /// A handle that can shut the socket down from another thread.
    pub(crate) fn shutdown_handle(&self) -> Result<TcpStream> {
        self.writer.try_clone().map_err(io_err)
    }
}

fn proto(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> io::Result<()> {
    line.clear();
    let n = r.read_until(b'\n', line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "Redis closed the connection",
        ));
    }
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(proto(format!(
            "bad RESP line {:?}",
            String::from_utf8_lossy(line)
        )));
    }
    line.truncate(line.len() - 2);
    Ok(())
}

fn parse_int(b: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| proto(format!("bad RESP integer {:?}", String::from_utf8_lossy(b))))
}

/// Reads one RESP2 reply.
pub(crate) fn read_reply<R: BufRead>(r: &mut R) -> io::Result<Reply> {
    let mut line = Vec::with_capacity(64);
    read_reply_with(r, &mut line)
}

fn read_reply_with<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> io::Result<Reply> {
    read_line(r, line)?;
    let body = &line[1..];
    Ok(match line[0] {
        b'+' => Reply::Status(String::from_utf8_lossy(body).into_owned()),
        b'-' => Reply::Error(String::from_utf8_lossy(body).into_owned()),
        b':' => Reply::Int(parse_int(body)?),
        b'$' => {
            let n = parse_int(body)?;
            if n < 0 {
                Reply::Bulk(None)
            } else if n > MAX_LEN {
                return Err(proto(format!("RESP bulk string of {n} bytes")));
            } else {
                let mut buf = vec![0u8; n as usize + 2];
                r.read_exact(&mut buf)?;
                if !buf.ends_with(b"\r\n") {
                    return Err(proto("RESP bulk string without CRLF".into()));
                }
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
        }
        b'*' => {
            let n = parse_int(body)?;
            if n < 0 {
                Reply::Array(None)
            } else if n > MAX_LEN {
                return Err(proto(format!("RESP array of {n} elements")));
            } else {
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    items.push(read_reply_with(r, line)?);
                }
                Reply::Array(Some(items))
            }
        }
        c => {
            return Err(proto(format!("unknown RESP type byte {:?}", c as char)));
        }
    })
}

/// A few idle connections to one Redis, opened on demand.
pub(crate) struct Pool {
    target: Target,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    pub(crate) fn new(target: Target) -> Pool {
        Pool {
            target,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on a connection. The connection goes back to the pool only when `f` succeeded
    /// (an error may leave replies unread); an I/O failure also drops every idle connection,
    /// since they most likely died with the same server.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut conn = loop {
            let next = self.lock().pop();
            match next {
                Some(c) if c.healthy() => break c,
                Some(_) => continue,
                None => break Conn::open(&self.target)?,
            }
        };
        match f(&mut conn) {
            Ok(v) => {
                if conn.pending == 0 && conn.out.is_empty() {
                    let mut idle = self.lock();
                    if idle.len() < POOL_IDLE {
                        idle.push(conn);
                    }
                }
                Ok(v)
            }
            Err(e) => {
                if matches!(e, StoreError::Unavailable(_)) {
                    self.lock().clear();
                }
                Err(e)
            }
        }
    }

    /// One command on a pooled connection; an error reply becomes an error.
    pub(crate) fn call<A: AsRef<[u8]>>(&self, args: &[A]) -> Result<Reply> {
        self.with(|c| c.call(args)?.check())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("redis://127.0.0.1:6380/3").unwrap();
        assert_eq!(
            t,
            Target {
                host: "127.0.0.1".into(),
                port: 6380,
                db: 3,
                user: None,
                password: None
            }
        );
        let t = Target::parse("redis://:s%40cret@redis").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("redis", 6379, 0));
        assert_eq!(t.password.as_deref(), Some("s@cret"));
        assert_eq!(t.user, None);
        let t = Target::parse("redis://muster:pw@[::1]:7000/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("::1", 7000, 0));
        assert_eq!(t.user.as_deref(), Some("muster"));
        assert_eq!(t.addr(), "[::1]:7000");
        for bad in [
            "redis://",
            "redis://h:x",
            "redis://h/x",
            "http://h",
            "redis://[::1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies() {
        let mut input: &[u8] =
            b"+OK\r\n-ERR no\r\n:42\r\n$3\r\na\r\n\r\n$-1\r\n*2\r\n$1\r\nx\r\n*-1\r\n*0\r\n";
        let want = [
            Reply::Status("OK".into()),
            Reply::Error("ERR no".into()),
            Reply::Int(42),
            Reply::Bulk(Some(b"a\r\n".to_vec())),
            Reply::Bulk(None),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"x".to_vec())),
                Reply::Array(None),
            ])),
            Reply::Array(Some(vec![])),
        ];
        for w in want {
            assert_eq!(read_reply(&mut input).unwrap(), w);
        }
        assert!(read_reply(&mut input).is_err(), "end of input");
        let mut buf = Vec::new();
        encode(&mut buf, &["SET", "k", ""]);
        assert_eq!(buf, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }
}
