//! Append-only log file (`/dev/stdout`, `/dev/stderr` or a regular file) that survives
//! rotation. Used by exporters on the flush thread; never touched by Envoy's threads.
//!
//! Rotation: before every write (one per drain of the queues, not per record) and every
//! [`ROTATION_CHECK`] while idle, the path is `stat`ed; if it no longer names the file we hold
//! open (renamed or removed by logrotate), we reopen it. Lines written before the check land in
//! the renamed file, lines after it in the new one: none lost. If the path cannot be reopened,
//! a renamed file keeps receiving lines; a removed one is dropped and writes fail, counted as
//! write errors, until the path can be opened again.
//!
//! Several writers to one file in this process (logger configs of several listeners on
//! `/dev/stdout`; the old and the new config while a listener update drains) take turns: see
//! [`write_lock`].
use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How often the path is checked for rotation while records flow.
pub const ROTATION_CHECK: Duration = Duration::from_millis(500);

/// The standard stream `path` names (`/dev/stdout`, `/dev/stderr`), as Envoy's own file
/// logger treats those two paths.
fn std_stream(path: &Path) -> Option<i32> {
    match path.as_os_str().as_encoded_bytes() {
        b"/dev/stdout" => Some(1),
        b"/dev/stderr" => Some(2),
        _ => None,
    }
}

/// Opens `path` for appending, creating it (mode 0644) if needed. `/dev/stdout` and
/// `/dev/stderr` share Envoy's own descriptor (a duplicate of it): when it is a socket —
/// systemd's journal — `open("/dev/stdout")` fails with ENXIO, and a pipe or FIFO reopened by
/// path could block.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(fd) = std_stream(path) {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor number has no memory effects; on success the
        // new descriptor is ours alone and `File` takes ownership of it.
        unsafe {
            let dup = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
            if dup < 0 {
                return Err(std::io::Error::last_os_error());
            }
            return Ok(std::os::fd::FromRawFd::from_raw_fd(dup));
        }
    }
    OpenOptions::new().append(true).create(true).open(path)
}

/// Checks, without opening anything for writing, that `path` could be opened by
/// [`open_append`]: for validation mode.
pub fn check_writable(path: &Path) -> Result<(), String> {
    if let Some(fd) = std_stream(path) {
        // SAFETY: F_GETFL on a descriptor number has no memory effects.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        return match fl {
            -1 => Err(format!("{} is closed", path.display())),
            fl if fl & libc::O_ACCMODE == libc::O_RDONLY => Err(format!("{} is not open for writing", path.display())),
            _ => Ok(()),
        };
    }
    if path.is_dir() {
        return Err(format!("{} is a directory", path.display()));
    }
    let exists = path.exists();
    let target = if exists { path.to_path_buf() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
    let target = if target.as_os_str().is_empty() { PathBuf::from(".") } else { target };
    if !target.exists() {
        return Err(format!("directory {} does not exist", target.display()));
    }
    let c =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| "path contains NUL".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!("{} is not writable: {}", target.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A file's (device, inode).
type FileId = (u64, u64);

/// The lock every writer of the file `id` in this process holds while it
/// writes. A write of more than `PIPE_BUF` (4 KiB) bytes to a pipe or socket is not atomic: the
/// kernel lets another writer in while it waits for room, so two flush threads writing their
/// drains to one `/dev/stdout` pipe (Docker, Kubernetes) would interleave in mid-line. Envoy's
/// own file logger avoids that with one writer per path.
fn write_lock(id: Option<FileId>) -> Arc<Mutex<()>> {
    static LOCKS: Mutex<Vec<(FileId, Weak<Mutex<()>>)>> = Mutex::new(Vec::new());
    let (Some(id), Ok(mut locks)) = (id, LOCKS.lock()) else { return Arc::default() };
    locks.retain(|(_, w)| w.strong_count() > 0);
    if let Some(l) = locks.iter().find(|(k, _)| *k == id).and_then(|(_, w)| w.upgrade()) {
        return l;
    }
    let l = Arc::new(Mutex::new(()));
    locks.push((id, Arc::downgrade(&l)));
    l
}

/// A file opened for appending that follows rotation of its path.
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    identity: Option<FileId>,
    /// Shared by every `LogFile` of this process writing to the same file.
    lock: Arc<Mutex<()>>,
    rotatable: bool,
    /// Not a regular file: a pipe (stdout under Docker or Kubernetes), a socket (systemd's
    /// journal), a terminal. Written in line-aligned chunks of at most `PIPE_BUF`, which a pipe
    /// takes whole (another process's writer on it, Envoy's own file logger, cannot land inside
    /// our lines), each only once `poll` says it fits: a reader that stops reading must not hold
    /// the flush thread in a `write` for good.
    stream: bool,
    last_check: Instant,
    /// When a failed reopen was last logged.
    last_warning: Option<Instant>,
}

impl LogFile {
    /// Wraps an already opened file (opened at config load, so errors reject the config).
    pub fn new(path: PathBuf, file: File) -> Self {
        let meta = file.metadata().ok();
        let identity = meta.as_ref().map(|m| (m.dev(), m.ino()));
        // Character devices and pipes (/dev/stdout) are not rotated.
        let rotatable = meta.as_ref().is_some_and(|m| m.is_file());
        let stream = meta.as_ref().is_some_and(|m| !m.is_file());
        let lock = write_lock(identity);
        LogFile {
            path,
            file: Some(file),
            identity,
            lock,
            rotatable,
            stream,
            last_check: Instant::now(),
            last_warning: None,
        }
    }

    /// Reopens the path if it was rotated (checked at most every [`ROTATION_CHECK`] unless
    /// `force`), or if the last write failed.
    pub fn maybe_reopen(&mut self, force: bool) {
        if self.file.is_some() && (!self.rotatable || (!force && self.last_check.elapsed() < ROTATION_CHECK)) {
            return;
        }
        self.last_check = Instant::now();
        let current = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if self.file.is_some() && current.is_some() && current == self.identity {
            return;
        }
        match open_append(&self.path) {
            Ok(f) => {
                self.identity = f.metadata().ok().map(|m| (m.dev(), m.ino()));
                self.lock = write_lock(self.identity);
                self.file = Some(f);
            }
            // The path cannot be reopened. A renamed file still holds what we write (keep
            // it); a removed one does not: drop it, so writes fail and are counted until the
            // path can be opened again. Either way the operator hears of it (logrotate's
            // `create` with an owner Envoy's user cannot write, say), once per minute.
            Err(e) => {
                if self.last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    self.last_warning = Some(Instant::now());
                    crate::envoy_log!(
                        crate::ffi::LogLevel::Warn,
                        "envoy-obs: cannot reopen {} after it was rotated or removed: {e}; {}",
                        self.path.display(),
                        if self.file.is_some() {
                            "still writing to the renamed file"
                        } else {
                            "writes fail until it can"
                        }
                    );
                }
                if self.file.as_ref().and_then(|f| f.metadata().ok()).is_none_or(|m| m.nlink() == 0) {
                    self.file = None;
                }
            }
        }
    }

    /// Appends `data` (whole lines) to the file, reopening it first if it was rotated. On
    /// error the handle is dropped so the next write retries the open, and the error is how
    /// many leading bytes of `data` are in the file as whole lines (a disk that fills up mid-way
    /// takes some; the line it split is cut off again). On a pipe or socket that has no room,
    /// `waiting` is called about every 200 ms until it does; when `waiting` returns false the
    /// write gives up (an error, as above).
    pub fn write(&mut self, data: &[u8], waiting: &mut dyn FnMut() -> bool) -> Result<(), usize> {
        // One stat per write (a write carries a whole drain, not a record): lines never go into
        // a file that was removed since the last write.
        self.maybe_reopen(true);
        // Another writer's lines never land inside ours, nor between our torn tail and its cut.
        // On a stream the other writer may be waiting on a reader that stalled: wait for our
        // turn the way we wait for room, heartbeat and deadline included.
        let _turn = if self.stream {
            loop {
                match self.lock.try_lock() {
                    Ok(g) => break g,
                    Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        if !waiting() {
                            return Err(0);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        } else {
            self.lock.lock().unwrap_or_else(|e| e.into_inner())
        };
        let r = match self.file.as_mut() {
            Some(f) if self.stream => {
                let fd = std::os::fd::AsRawFd::as_raw_fd(f);
                append_in_pipe_chunks(f, data, &mut || writable(fd, waiting))
            }
            Some(f) => append_lines(f, data).inspect_err(|t| {
                // A failed write (disk full) may have appended part of a line: cut that part
                // off, so no line is ever split and the failed lines are counted once.
                if self.rotatable && t.last > 0 {
                    cut_torn_tail(f, t.last);
                }
            }),
            None => return Err(0),
        };
        r.map_err(|t| {
            self.file = None;
            // The counter says how many; the log says why (a full disk, a closed pipe).
            if self.last_warning.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
                self.last_warning = Some(Instant::now());
                let why = match t.errno {
                    0 if self.stream => "the reader took nothing until the drain deadline".to_string(),
                    0 => "nothing was written".to_string(),
                    e => std::io::Error::from_raw_os_error(e).to_string(),
                };
                crate::envoy_log!(
                    crate::ffi::LogLevel::Warn,
                    "envoy-obs: writing to {} failed: {why}; the lines not written count as write_errors",
                    self.path.display()
                );
            }
            t.whole
        })
    }
}

/// What a failed [`append_lines`] left in the file.
#[derive(Debug, PartialEq, Eq)]
struct Torn {
    /// Leading bytes of the data written as whole lines.
    whole: usize,
    /// Bytes of a split line at the end of what the `write` calls took (a line may be split
    /// over several of them).
    last: u64,
    /// The error the last `write` returned (0: it took nothing, or the wait for room ended).
    errno: i32,
}

/// Writes `data` (whole lines) with as many `write` calls as it takes.
fn append_lines<W: Write>(w: &mut W, data: &[u8]) -> Result<(), Torn> {
    let (mut done, mut torn) = (0, Torn { whole: 0, last: 0, errno: 0 });
    while done < data.len() {
        match w.write(&data[done..]) {
            Ok(0) => return Err(torn),
            Ok(n) => {
                if let Some(i) = data[done..done + n].iter().rposition(|&c| c == b'\n') {
                    torn.whole = done + i + 1;
                }
                done += n;
                torn.last = (done - torn.whole) as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                torn.errno = e.raw_os_error().unwrap_or(0);
                return Err(torn);
            }
        }
    }
    Ok(())
}

/// Bytes a pipe takes in one piece (POSIX `PIPE_BUF`, 4096 on Linux).
const PIPE_BUF: usize = 4096;

/// [`append_lines`] in chunks of whole lines no bigger than [`PIPE_BUF`], each of which the
/// kernel writes to a pipe without interleaving another writer's data; a longer line goes on
/// its own, in pieces of `PIPE_BUF` (and may still be split by a concurrent writer). Before each
/// write `ready` must say there is room; when it says no, the write stops there.
fn append_in_pipe_chunks<W: Write>(w: &mut W, data: &[u8], ready: &mut dyn FnMut() -> bool) -> Result<(), Torn> {
    let mut start = 0;
    while start < data.len() {
        let limit = (start + PIPE_BUF).min(data.len());
        let end = if limit == data.len() {
            limit
        } else {
            match data[start..limit].iter().rposition(|&c| c == b'\n') {
                Some(i) => start + i + 1,
                None => data[start..].iter().position(|&c| c == b'\n').map_or(data.len(), |i| start + i + 1),
            }
        };
        // A chunk is whole lines in one piece, or one long line in several: lines end inside
        // a piece only in the first case.
        let mut done = start;
        while done < end {
            let piece = (end - done).min(PIPE_BUF);
            if !ready() {
                return Err(Torn { whole: start, last: (done - start) as u64, errno: 0 });
            }
            append_lines(w, &data[done..done + piece]).map_err(|t| Torn {
                whole: if t.whole > 0 { done + t.whole } else { start },
                last: if t.whole > 0 { t.last } else { (done - start) as u64 + t.last },
                errno: t.errno,
            })?;
            done += piece;
        }
        start = end;
    }
    Ok(())
}

/// Waits until a write of up to [`PIPE_BUF`] bytes to `fd` would not block, calling `waiting`
/// every 200 ms meanwhile; false as soon as `waiting` does. An error or hang-up counts as
/// ready: the write then reports it.
fn writable(fd: std::os::fd::RawFd, waiting: &mut dyn FnMut() -> bool) -> bool {
    // First a look without waiting: past the shutdown deadline, every later write of the drain
    // then gives up at once instead of after one more wait each.
    let mut timeout = 0;
    loop {
        let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, timeout) };
        if r != 0 {
            if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return true;
        }
        if !waiting() {
            return false;
        }
        timeout = 200;
    }
}

/// Removes the `torn` bytes our last write left at the end of the file, but only while they are
/// still its end: another writer appending to the same file (a second logger, another process)
/// may have written after them, and cutting there would remove its lines. (The file position of
/// an append-mode descriptor is the end of its own last write.)
fn cut_torn_tail(f: &mut File, torn: u64) {
    let (Ok(ours), Ok(meta)) = (f.stream_position(), f.metadata()) else { return };
    if meta.len() == ours && ours >= torn {
        let _ = f.set_len(ours - torn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each `write` call.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);
    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_pipe_gets_whole_lines_in_pieces_it_writes_atomically() {
        let mut data = Vec::new();
        for i in 0..300 {
            data.extend_from_slice(format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(90)).as_bytes());
        }
        let long = format!("{}\n", "L".repeat(10_000));
        data.extend_from_slice(long.as_bytes());
        data.extend_from_slice(b"{\"tail\":1}\n");
        let mut w = Calls::default();
        append_in_pipe_chunks(&mut w, &data, &mut || true).unwrap();
        assert_eq!(w.0.concat(), data);
        assert!(w.0.iter().all(|c| c.len() <= PIPE_BUF), "no write the pipe may block in for good");
        // Every piece ends a line, but those of the line longer than the pipe's atomic size.
        let ends: Vec<bool> = w.0.iter().map(|c| c.ends_with(b"\n")).collect();
        let long_pieces = long.len().div_ceil(PIPE_BUF);
        assert_eq!(ends.iter().filter(|e| !**e).count(), long_pieces - 1, "{ends:?}");
        assert!(w.0.iter().filter(|c| !c.ends_with(b"\n")).all(|c| c.iter().all(|&b| b == b'L')));
    }

    /// A writer that takes `room` bytes, at most `per_call` per call, then fails like a full disk.
    struct Filling {
        got: Vec<u8>,
        room: usize,
        per_call: usize,
    }

    impl Write for Filling {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = b.len().min(self.per_call).min(self.room - self.got.len());
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_disk_reports_the_fragment_of_the_last_write() {
        let data = b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n";
        let t = |whole, last| Err(Torn { whole, last, errno: libc::ENOSPC });
        // A line split over several short writes is cut whole: (12, 10) wrote 10 then 2 bytes,
        // (14, 3) five writes with no newline in the last three.
        let cases = [
            (100, 100, Ok(())),
            (12, 100, t(8, 4)),
            (16, 100, t(16, 0)),
            (3, 100, t(0, 3)),
            (12, 10, t(8, 4)),
            (14, 3, t(8, 6)),
            (5, 1, t(0, 5)),
        ];
        for (room, per_call, want) in cases {
            let mut w = Filling { got: Vec::new(), room, per_call };
            assert_eq!(append_lines(&mut w, data), want, "room {room}, {per_call} per call");
        }
    }

    /// The torn tail is cut while it is the end of the file, and left alone once another writer
    /// has appended after it (cutting then would remove that writer's lines).
    #[test]
    fn the_torn_tail_is_cut_only_while_it_ends_the_file() {
        let d = tmpdir("torn");
        let p = d.join("shared.log");
        let mut ours = open_append(&p).unwrap();
        ours.write_all(b"{\"ok\":1}\n{\"to").unwrap();
        cut_torn_tail(&mut ours, 4);
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"ok\":1}\n");
        ours.write_all(b"{\"to").unwrap();
        let mut other = open_append(&p).unwrap();
        other.write_all(b"{\"other\":1}\n").unwrap();
        cut_torn_tail(&mut ours, 4);
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"ok\":1}\n{\"to{\"other\":1}\n");
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("envoy-obs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn standard_streams_share_envoys_descriptor() {
        use std::os::fd::AsRawFd;
        let f = open_append(Path::new("/dev/stderr")).unwrap();
        assert!(f.as_raw_fd() > 2);
        // SAFETY: plain-old-data structs, all-zero is a valid value.
        let (mut a, mut b): (libc::stat, libc::stat) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: fstat on valid descriptors into structs we own.
        unsafe {
            assert_eq!(libc::fstat(2, &mut a), 0);
            assert_eq!(libc::fstat(f.as_raw_fd(), &mut b), 0);
        }
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        assert!(check_writable(Path::new("/dev/stderr")).is_ok());
        let d = tmpdir("isdir");
        assert!(check_writable(&d).unwrap_err().contains("is a directory"));
    }

    /// Two writers (two logger configs) on one pipe, each writing drains far larger than the
    /// pipe holds, with a slow reader: every line arrives whole.
    #[test]
    fn writers_sharing_a_pipe_never_split_each_others_lines() {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors, which the Files below then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from pipe(2)/dup(2), each owned by exactly one File.
        let (mut rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let wr2 = wr.try_clone().unwrap();
        let line = |c: u8| {
            let mut l = vec![c; 999];
            l.push(b'\n');
            l
        };
        let writers: Vec<_> = [(wr, b'a'), (wr2, b'b')]
            .into_iter()
            .map(|(f, c)| {
                std::thread::spawn(move || {
                    let mut lf = LogFile::new(PathBuf::from("/dev/null/pipe"), f);
                    let drain: Vec<u8> = (0..300).flat_map(|_| line(c)).collect();
                    for _ in 0..8 {
                        lf.write(&drain, &mut || true).unwrap();
                    }
                })
            })
            .collect();
        let reader = std::thread::spawn(move || {
            let (mut all, mut buf) = (Vec::new(), [0u8; 4096]);
            loop {
                match rd.read(&mut buf) {
                    Ok(0) | Err(_) => return all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        });
        for w in writers {
            w.join().unwrap();
        }
        let all = reader.join().unwrap();
        let lines: Vec<&[u8]> = all.split_inclusive(|&c| c == b'\n').collect();
        assert_eq!(lines.len(), 2 * 8 * 300);
        assert!(lines.iter().all(|l| *l == line(b'a').as_slice() || *l == line(b'b').as_slice()));
    }

    /// A pipe whose reader stopped reading: the write waits (asking `waiting` every 200 ms)
    /// instead of blocking for good, and gives up when told, saying how many whole lines got in.
    #[test]
    fn a_write_to_a_stalled_pipe_waits_and_can_give_up() {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors, which the Files below then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from pipe(2), each owned by exactly one File.
        let (mut rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let mut lf = LogFile::new(PathBuf::from("/dev/null/pipe"), wr);
        let line = format!("{}\n", "x".repeat(99));
        let data = line.repeat(10_000); // 1 MB: 16 times what the pipe holds
        let (start, mut waits) = (Instant::now(), 0);
        let whole = lf.write(data.as_bytes(), &mut || {
            waits += 1;
            waits < 3
        });
        let whole = whole.expect_err("gave up");
        assert_eq!(waits, 3);
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        assert!(whole > 0 && whole.is_multiple_of(line.len()), "{whole}");
        // What got in is those whole lines, and the pipe still works.
        let mut got = vec![0u8; whole];
        rd.read_exact(&mut got).unwrap();
        assert!(got.split_inclusive(|&c| c == b'\n').all(|l| l == line.as_bytes()));
        // Past the deadline (`waiting` says no at once) a write on a full pipe gives up without
        // waiting first: a drain's many writes at shutdown must not each wait 200 ms.
        let t0 = Instant::now();
        assert!(lf.write(data.as_bytes(), &mut || false).is_err());
        assert!(lf.write(data.as_bytes(), &mut || false).is_err());
        assert!(t0.elapsed() < Duration::from_millis(150), "{:?}", t0.elapsed());
    }

    /// Two configs on one stalled stdout pipe share the write lock: the one waiting for the
    /// lock waits like the one waiting for room (asking `waiting`), so it can give up too.
    #[test]
    fn a_writer_waiting_for_the_lock_on_a_stalled_pipe_can_give_up() {
        use std::os::fd::FromRawFd;
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors, which the Files below then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from pipe(2), each owned by exactly one File.
        let (_rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let wr2 = wr.try_clone().unwrap();
        let data = "y".repeat(99).to_string() + "\n";
        let data = Arc::new(data.repeat(10_000));
        let (stop_a, a_waits) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (d, s, w) = (data.clone(), stop_a.clone(), a_waits.clone());
        let a = std::thread::spawn(move || {
            let mut lf = LogFile::new(PathBuf::from("/dev/null/pipe"), wr);
            lf.write(d.as_bytes(), &mut || {
                w.store(true, Ordering::Relaxed);
                !s.load(Ordering::Relaxed)
            })
        });
        // A has filled the pipe and waits for room, holding the lock.
        while !a_waits.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut b = LogFile::new(PathBuf::from("/dev/null/pipe"), wr2);
        let (t0, mut asked) = (Instant::now(), 0);
        let r = b.write(data.as_bytes(), &mut || {
            asked += 1;
            asked < 5
        });
        assert_eq!(r, Err(0));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        stop_a.store(true, Ordering::Relaxed);
        assert!(a.join().unwrap().is_err());
    }

    #[test]
    fn appends() {
        let d = tmpdir("write");
        let p = d.join("a.log");
        let mut f = LogFile::new(p.clone(), open_append(&p).unwrap());
        assert!(f.write(b"a\n", &mut || true).is_ok() && f.write(b"b\n", &mut || true).is_ok());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a\nb\n");
    }

    #[test]
    fn reopens_after_rename_without_losing_lines() {
        let d = tmpdir("rotate");
        let p = d.join("a.log");
        let mut e = LogFile::new(p.clone(), open_append(&p).unwrap());
        let _ = e.write(b"1\n", &mut || true);
        std::fs::rename(&p, d.join("a.log.1")).unwrap();
        let _ = e.write(b"2\n", &mut || true); // may still land in the renamed file
        e.maybe_reopen(true);
        let _ = e.write(b"3\n", &mut || true);
        let old = std::fs::read_to_string(d.join("a.log.1")).unwrap();
        let new = std::fs::read_to_string(&p).unwrap();
        assert_eq!(format!("{old}{new}"), "1\n2\n3\n");
        assert!(new.contains('3'));
    }

    #[test]
    fn recreates_a_removed_file() {
        let d = tmpdir("remove");
        let p = d.join("a.log");
        let mut e = LogFile::new(p.clone(), open_append(&p).unwrap());
        let _ = e.write(b"1\n", &mut || true);
        std::fs::remove_file(&p).unwrap();
        e.maybe_reopen(true);
        let _ = e.write(b"2\n", &mut || true);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "2\n");
    }

    #[test]
    fn a_removed_file_that_cannot_be_recreated_fails_writes_until_it_can() {
        let d = tmpdir("unwritable");
        let p = d.join("a.log");
        let mut e = LogFile::new(p.clone(), open_append(&p).unwrap());
        assert!(e.write(b"one\n", &mut || true).is_ok());
        std::fs::remove_file(&p).unwrap();
        std::fs::remove_dir(&d).unwrap();
        e.maybe_reopen(true);
        assert_eq!(
            e.write(b"lost\n", &mut || true),
            Err(0),
            "writing into a deleted file would lose the line uncounted"
        );
        std::fs::create_dir_all(&d).unwrap();
        assert!(e.write(b"two\n", &mut || true).is_ok());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two\n");
    }

    #[test]
    fn validation_check_names_the_problem() {
        assert!(check_writable(Path::new("/nonexistent-dir-xyz/a.log")).unwrap_err().contains("does not exist"));
        let d = tmpdir("check");
        assert!(check_writable(&d.join("x.log")).is_ok());
    }
}
