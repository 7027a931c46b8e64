//! `%START_TIME(...)%`-style time formatting, compiled once at config load.
//!
//! Supports Envoy's extensions (`%s` epoch seconds, `%f`/`%1f`..`%9f`/`%*f` fractional seconds)
//! and what Envoy's formatter takes from absl (`%E1S`..`%E9S`, `%E*S`, `%E*f`, `%Ez`, `%E`/`%O`
//! modifiers) besides the strftime conversions, each checked against Envoy 1.40's output.
//! Times are UTC, as in Envoy, except the `_LOCAL` operators' ([`TimeFormat::local`]): those
//! render in the process's local time zone (`TZ`, else `/etc/localtime`), as Envoy's
//! `absl::LocalTimeZone()` does. An unsupported conversion rejects the config.

/// Envoy's default `%START_TIME%` format.
pub const DEFAULT: &str = "%Y-%m-%dT%H:%M:%E3SZ";
/// Envoy's default format of the `_LOCAL` operators (`AccessLogDateTimeFormatter`).
pub const DEFAULT_LOCAL: &str = "%Y-%m-%dT%H:%M:%E3S%z";

#[derive(Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tok {
    Lit(Vec<u8>),
    Year,
    Year2,
    Month,
    Day,
    DaySpace,
    Hour,
    Hour12,
    Min,
    Sec,
    Frac(u8),
    /// The fraction without its trailing zeros (`%*f`; "0" when there is none); with `dot`, a
    /// point before it, and nothing at all when the fraction is zero (`%E*S`).
    FracTrim {
        dot: bool,
    },
    Epoch,
    /// ISO 8601 weekday (Monday 1 .. Sunday 7), `%u`.
    WeekdayIso,
    /// Weekday (Sunday 0 .. Saturday 6), `%w`.
    WeekdayNum,
    /// ISO 8601 week number, `%V`.
    IsoWeek,
    /// ISO 8601 week-based year, `%G`; its last two digits, `%g`.
    IsoYear,
    IsoYear2,
    /// Week of the year, weeks starting on Sunday (`%U`) or Monday (`%W`).
    WeekSun,
    WeekMon,
    /// Century, `%C`.
    Century,
    /// Hours padded with a space, `%k` (24 h) and `%l` (12 h).
    HourSpace,
    Hour12Space,
    DayOfYear,
    WeekdayShort,
    WeekdayLong,
    MonthShort,
    MonthLong,
    AmPm,
    /// `am`/`pm`, `%P` (a GNU conversion Envoy's strftime serves).
    AmPmLower,
    TzOffset,
    /// `+00:00`, `%Ez`.
    TzOffsetColon,
    TzName,
    /// A conversion with strftime's flags or a field width (`%-d`, `%_5H`, `%^a`, `%10B`).
    Flagged(Box<(Tok, Flags)>),
}

/// strftime's flags and field width on one conversion, as glibc (which Envoy's absl hands
/// these conversions to) applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flags {
    /// The last of `-` (no padding), `_` (spaces), `0` (zeros); 0 when none was given.
    pad: u8,
    /// `^`: upper case.
    upper: bool,
    /// `#`: the other case (upper for names, lower for `%p` and `%Z`).
    swap: bool,
    /// The field width; 0 when none was given.
    width: u16,
}

impl Tok {
    /// For a number: its digits without a width and whether it pads with spaces (`%e`, `%k`,
    /// `%l`). None for a name.
    fn number_digits(&self) -> Option<(usize, bool)> {
        Some(match self {
            Tok::Year | Tok::IsoYear => (4, false),
            Tok::DayOfYear => (3, false),
            Tok::WeekdayIso | Tok::WeekdayNum => (1, false),
            Tok::DaySpace | Tok::HourSpace | Tok::Hour12Space => (2, true),
            Tok::Year2
            | Tok::Month
            | Tok::Day
            | Tok::Hour
            | Tok::Hour12
            | Tok::Min
            | Tok::Sec
            | Tok::IsoWeek
            | Tok::IsoYear2
            | Tok::WeekSun
            | Tok::WeekMon
            | Tok::Century => (2, false),
            _ => return None,
        })
    }

    /// Whether rendering needs the calendar date.
    fn needs_date(&self) -> bool {
        match self {
            Tok::Flagged(f) => f.0.needs_date(),
            t => matches!(
                t,
                Tok::Year
                    | Tok::Year2
                    | Tok::Month
                    | Tok::Day
                    | Tok::DaySpace
                    | Tok::DayOfYear
                    | Tok::MonthShort
                    | Tok::MonthLong
                    | Tok::IsoWeek
                    | Tok::IsoYear
                    | Tok::IsoYear2
                    | Tok::WeekSun
                    | Tok::WeekMon
                    | Tok::Century
            ),
        }
    }
}

impl Flags {
    /// Reworks the default rendering of `tok` at `out[at..]` as the flags ask (glibc's rules,
    /// each checked against Envoy's output).
    fn apply(&self, tok: &Tok, out: &mut Vec<u8>, at: usize) {
        let width = self.width as usize;
        let (fill, target) = match tok.number_digits() {
            Some((digits, spaces)) => {
                // The number's own digits, then padded afresh: `-` pads only up to an explicit
                // width (with spaces); otherwise to the width or the default digits, whichever
                // is more, with the flag's fill or the conversion's own.
                let lead = out[at..].iter().take_while(|&&c| c == b' ' || c == b'0').count();
                let lead = lead.min(out.len() - at - 1);
                out.drain(at..at + lead);
                match self.pad {
                    b'-' => (b' ', width),
                    b'_' => (b' ', width.max(digits)),
                    b'0' => (b'0', width.max(digits)),
                    _ => (if spaces { b' ' } else { b'0' }, width.max(digits)),
                }
            }
            None => {
                let name = &mut out[at..];
                let lower_on_swap = matches!(tok, Tok::AmPm | Tok::AmPmLower);
                if self.swap && lower_on_swap {
                    name.make_ascii_lowercase();
                } else if (self.swap || self.upper) && !matches!(tok, Tok::AmPmLower) {
                    name.make_ascii_uppercase();
                }
                (if self.pad == b'0' { b'0' } else { b' ' }, width)
            }
        };
        let len = out.len() - at;
        if target > len {
            out.splice(at..at, std::iter::repeat_n(fill, target - len));
        }
    }
}

/// A compiled time format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeFormat {
    toks: Vec<Tok>,
    /// Tokens before this index depend only on the whole second, so their rendering is cached
    /// per second (a log's records mostly share their second).
    split: usize,
    /// The tokens from `split` on are fractions and literals only (Envoy's default format
    /// ends in `%E3SZ`): rendered without any calendar arithmetic.
    frac_tail: bool,
    /// Identity for the prefix cache (clones share it: same tokens, same output).
    id: u64,
    /// Rendered in the local time zone rather than UTC.
    local: bool,
}

/// A UTC offset and the zone's abbreviation, for one second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Zone {
    /// Seconds east of UTC.
    off: i64,
    name: [u8; 15],
    name_len: u8,
}

impl Zone {
    const UTC: Zone = Zone { off: 0, name: *b"UTC\0\0\0\0\0\0\0\0\0\0\0\0", name_len: 3 };

    fn name(&self) -> &[u8] {
        &self.name[..self.name_len as usize]
    }

    /// The local zone at `secs` (libc's `localtime_r`, which reads `TZ` or `/etc/localtime`
    /// once per process). Cached per thread for the last second asked: records mostly share
    /// their second.
    fn local(secs: i64) -> Zone {
        thread_local! {
            static LAST: std::cell::Cell<(i64, Zone)> = const { std::cell::Cell::new((i64::MIN, Zone::UTC)) };
        }
        let (at, z) = LAST.with(|c| c.get());
        if at == secs {
            return z;
        }
        let z = Zone::lookup(secs).unwrap_or(Zone::UTC);
        LAST.with(|c| c.set((secs, z)));
        z
    }

    // time_t and tm_gmtoff are i64 on the 64-bit targets Envoy ships for, not everywhere.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    fn lookup(secs: i64) -> Option<Zone> {
        let t: libc::time_t = secs.try_into().ok()?;
        let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
        // SAFETY: both pointers are valid for the call; localtime_r fills `tm` or returns NULL.
        if unsafe { libc::localtime_r(&t, tm.as_mut_ptr()) }.is_null() {
            return None;
        }
        // SAFETY: localtime_r returned non-NULL, so `tm` is initialised.
        let tm = unsafe { tm.assume_init() };
        let mut z = Zone { off: tm.tm_gmtoff as i64, name: [0; 15], name_len: 0 };
        if !tm.tm_zone.is_null() {
            // SAFETY: tm_zone points at a NUL-terminated abbreviation owned by libc.
            let name = unsafe { std::ffi::CStr::from_ptr(tm.tm_zone) }.to_bytes();
            let n = name.len().min(z.name.len());
            z.name[..n].copy_from_slice(&name[..n]);
            z.name_len = n as u8;
        }
        Some(z)
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// Per rendering thread: (format id, second, rendered second-dependent prefix).
    static PREFIX_CACHE: std::cell::RefCell<Vec<(u64, i64, Vec<u8>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

const WD_SHORT: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const WD_LONG: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MON_SHORT: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const MON_LONG: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

impl TimeFormat {
    /// Compiles `fmt`, or names the conversion it cannot serve.
    pub fn compile(fmt: &str) -> Result<TimeFormat, String> {
        let b = fmt.as_bytes();
        let mut toks = Vec::new();
        let mut lit = Vec::new();
        let mut i = 0;
        let flush = |lit: &mut Vec<u8>, toks: &mut Vec<Tok>| {
            if !lit.is_empty() {
                toks.push(Tok::Lit(std::mem::take(lit)));
            }
        };
        while i < b.len() {
            if b[i] != b'%' {
                lit.push(b[i]);
                i += 1;
                continue;
            }
            let Some(&c) = b.get(i + 1) else { return Err(format!("time format {fmt:?} ends with a lone %")) };
            if let Some((tok, len)) = flagged(fmt, &b[i + 1..])? {
                flush(&mut lit, &mut toks);
                toks.push(tok);
                i += 1 + len;
                continue;
            }
            let mut adv = 2;
            // absl's alternative forms: `%Ec`, `%Od`, ... print as the plain conversion here
            // (Envoy formats in the C locale); `%E<digit>S`, `%E*S`, `%E<digit>f`, `%E*f` and
            // `%Ez` are handled below.
            let c = match (c, b.get(i + 2).copied()) {
                (b'E', Some(n @ (b'c' | b'C' | b'x' | b'X' | b'y' | b'Y')))
                | (
                    b'O',
                    Some(
                        n @ (b'd' | b'e' | b'H' | b'I' | b'm' | b'M' | b'S' | b'u' | b'U' | b'V' | b'w' | b'W' | b'y'),
                    ),
                ) => {
                    i += 1;
                    n
                }
                _ => c,
            };
            // Composite conversions, as the conversions they stand for.
            let expand = |f: &str| TimeFormat::compile(f).map(|t| t.toks);
            let tok = match c {
                b'%' => {
                    lit.push(b'%');
                    i += 2;
                    continue;
                }
                // Envoy rejects a newline in a time format (it would split the log line).
                b'n' => return Err(format!("time format {fmt:?}: %n (a newline) is not allowed")),
                b't' => {
                    lit.push(b'\t');
                    i += 2;
                    continue;
                }
                b'Y' => vec![Tok::Year],
                b'y' => vec![Tok::Year2],
                b'm' => vec![Tok::Month],
                b'd' => vec![Tok::Day],
                b'e' => vec![Tok::DaySpace],
                b'H' => vec![Tok::Hour],
                b'I' => vec![Tok::Hour12],
                b'M' => vec![Tok::Min],
                b'S' => vec![Tok::Sec],
                b's' => vec![Tok::Epoch],
                b'f' => vec![Tok::Frac(9)],
                b'j' => vec![Tok::DayOfYear],
                b'a' => vec![Tok::WeekdayShort],
                b'A' => vec![Tok::WeekdayLong],
                b'b' | b'h' => vec![Tok::MonthShort],
                b'B' => vec![Tok::MonthLong],
                b'p' => vec![Tok::AmPm],
                b'P' => vec![Tok::AmPmLower],
                b'z' => vec![Tok::TzOffset],
                b'Z' => vec![Tok::TzName],
                b'F' => expand("%Y-%m-%d")?,
                b'T' | b'X' => expand("%H:%M:%S")?,
                b'R' => expand("%H:%M")?,
                b'D' | b'x' => expand("%m/%d/%y")?,
                b'1'..=b'9' if b.get(i + 2) == Some(&b'f') => {
                    adv = 3;
                    vec![Tok::Frac(c - b'0')]
                }
                b'*' if b.get(i + 2) == Some(&b'f') => {
                    adv = 3;
                    vec![Tok::FracTrim { dot: false }]
                }
                b'E' if matches!(b.get(i + 2), Some(b'1'..=b'9')) && b.get(i + 3) == Some(&b'S') => {
                    adv = 4;
                    // Seconds, a point, the fraction: the first two are cached per second.
                    vec![Tok::Sec, Tok::Lit(b".".to_vec()), Tok::Frac(b[i + 2] - b'0')]
                }
                b'E' if matches!(b.get(i + 2), Some(b'1'..=b'9')) && b.get(i + 3) == Some(&b'f') => {
                    adv = 4;
                    vec![Tok::Frac(b[i + 2] - b'0')]
                }
                b'E' if b.get(i + 2) == Some(&b'*') && matches!(b.get(i + 3), Some(b'S' | b'f')) => {
                    adv = 4;
                    match b[i + 3] {
                        b'S' => vec![Tok::Sec, Tok::FracTrim { dot: true }],
                        _ => vec![Tok::FracTrim { dot: false }],
                    }
                }
                b'E' if b.get(i + 2) == Some(&b'z') => {
                    adv = 3;
                    vec![Tok::TzOffsetColon]
                }
                b'u' => vec![Tok::WeekdayIso],
                b'w' => vec![Tok::WeekdayNum],
                b'V' => vec![Tok::IsoWeek],
                b'G' => vec![Tok::IsoYear],
                b'g' => vec![Tok::IsoYear2],
                b'U' => vec![Tok::WeekSun],
                b'W' => vec![Tok::WeekMon],
                b'C' => vec![Tok::Century],
                b'k' => vec![Tok::HourSpace],
                b'l' => vec![Tok::Hour12Space],
                b'r' => expand("%I:%M:%S %p")?,
                b'c' => expand("%a %b %e %H:%M:%S %Y")?,
                _ => {
                    let end = (i + 4).min(b.len());
                    return Err(format!(
                        "time format {fmt:?}: unsupported conversion {:?}",
                        String::from_utf8_lossy(&b[i..end]).chars().take(2).collect::<String>()
                    ));
                }
            };
            flush(&mut lit, &mut toks);
            toks.extend(tok);
            i += adv;
        }
        flush(&mut lit, &mut toks);
        let split = toks
            .iter()
            .position(|t| matches!(t, Tok::Frac(_) | Tok::FracTrim { .. } | Tok::Epoch))
            .unwrap_or(toks.len());
        let frac_tail = toks[split..].iter().all(|t| matches!(t, Tok::Frac(_) | Tok::FracTrim { .. } | Tok::Lit(_)));
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(TimeFormat { toks, split, frac_tail, id, local: false })
    }

    /// This format in the local time zone (`%START_TIME_LOCAL%` and the like).
    pub fn local(mut self) -> TimeFormat {
        self.local = true;
        // Its own identity in the per-second prefix cache: a UTC rendering must never serve it.
        self.id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self
    }

    fn zone(&self, unix_ns: i64) -> Zone {
        if self.local {
            Zone::local(unix_ns.div_euclid(1_000_000_000))
        } else {
            Zone::UTC
        }
    }

    /// Appends the rendering of `unix_ns` to `out`, in UTC or (for a [`TimeFormat::local`]
    /// format) the local zone.
    pub fn write(&self, unix_ns: i64, out: &mut Vec<u8>) {
        if self.split == 0 {
            return self.write_toks(&self.toks, unix_ns, self.zone(unix_ns), out);
        }
        let secs = unix_ns.div_euclid(1_000_000_000);
        let key = self.id;
        let hit = PREFIX_CACHE.with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else { return false };
            let slot = match c.iter().position(|e| e.0 == key) {
                Some(i) => i,
                None => {
                    if c.len() >= 16 {
                        c.clear();
                    }
                    c.push((key, i64::MIN, Vec::new()));
                    c.len() - 1
                }
            };
            let e = &mut c[slot];
            if e.1 != secs {
                e.2.clear();
                self.write_toks(&self.toks[..self.split], unix_ns, self.zone(unix_ns), &mut e.2);
                e.1 = secs;
            }
            out.extend_from_slice(&e.2);
            true
        });
        if hit && self.frac_tail {
            let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
            for t in &self.toks[self.split..] {
                match t {
                    Tok::Frac(n) => frac(out, nanos, *n),
                    Tok::FracTrim { dot } => frac_trim(out, nanos, *dot),
                    Tok::Lit(l) => out.extend_from_slice(l),
                    _ => {}
                }
            }
        } else if hit {
            self.write_toks(&self.toks[self.split..], unix_ns, self.zone(unix_ns), out);
        } else {
            self.write_toks(&self.toks, unix_ns, self.zone(unix_ns), out);
        }
    }

    fn write_toks(&self, toks: &[Tok], unix_ns: i64, zone: Zone, out: &mut Vec<u8>) {
        let secs = unix_ns.div_euclid(1_000_000_000);
        let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
        // The wall clock of the zone; `%s` stays the epoch's.
        let wall = secs + zone.off;
        let days = wall.div_euclid(86_400);
        let sod = wall.rem_euclid(86_400) as u32;
        // The calendar date only for tokens that need it (the cached-prefix path renders just
        // the sub-second tail).
        let needs_date = toks.iter().any(Tok::needs_date);
        let (y, m, d) = if needs_date { civil_from_days(days) } else { (1970, 1, 1) };
        let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
        for t in toks {
            match t {
                Tok::Lit(l) if l.len() == 1 => out.push(l[0]),
                Tok::Lit(l) => out.extend_from_slice(l),
                Tok::Year => pad(out, y as u64, 4),
                Tok::Year2 => pad(out, y.rem_euclid(100) as u64, 2),
                Tok::Month => pad(out, m as u64, 2),
                Tok::Day => pad(out, d as u64, 2),
                Tok::DaySpace => {
                    if d < 10 {
                        out.push(b' ');
                    }
                    pad(out, d as u64, 1)
                }
                Tok::Hour => pad(out, hh as u64, 2),
                Tok::Hour12 => pad(out, (if hh % 12 == 0 { 12 } else { hh % 12 }) as u64, 2),
                Tok::Min => pad(out, mm as u64, 2),
                Tok::Sec => pad(out, ss as u64, 2),
                Tok::Frac(n) => frac(out, nanos, *n),
                Tok::FracTrim { dot } => frac_trim(out, nanos, *dot),
                Tok::WeekdayIso => pad(out, ((weekday(days) + 6) % 7 + 1) as u64, 1),
                Tok::WeekdayNum => pad(out, weekday(days) as u64, 1),
                Tok::IsoWeek => pad(out, iso_week(days, y).1 as u64, 2),
                Tok::IsoYear => pad(out, iso_week(days, y).0.max(0) as u64, 4),
                Tok::IsoYear2 => pad(out, iso_week(days, y).0.rem_euclid(100) as u64, 2),
                Tok::WeekSun | Tok::WeekMon => {
                    let yday = days - days_from_civil(y, 1, 1);
                    let wd = weekday(days) as i64;
                    let wd = if matches!(t, Tok::WeekMon) { (wd + 6) % 7 } else { wd };
                    pad(out, ((yday + 7 - wd) / 7) as u64, 2)
                }
                Tok::Century => pad(out, y.div_euclid(100).max(0) as u64, 2),
                Tok::HourSpace | Tok::Hour12Space => {
                    let h = if matches!(t, Tok::HourSpace) {
                        hh
                    } else if hh % 12 == 0 {
                        12
                    } else {
                        hh % 12
                    };
                    if h < 10 {
                        out.push(b' ');
                    }
                    pad(out, h as u64, 1)
                }
                Tok::TzOffsetColon => write_offset(out, zone.off, true),
                Tok::Epoch => {
                    let mut b = itoa::Buffer::new();
                    out.extend_from_slice(b.format(secs).as_bytes());
                }
                Tok::DayOfYear => pad(out, (days - days_from_civil(y, 1, 1) + 1) as u64, 3),
                Tok::WeekdayShort => out.extend_from_slice(WD_SHORT[weekday(days)].as_bytes()),
                Tok::WeekdayLong => out.extend_from_slice(WD_LONG[weekday(days)].as_bytes()),
                Tok::MonthShort => out.extend_from_slice(MON_SHORT[(m - 1) as usize].as_bytes()),
                Tok::MonthLong => out.extend_from_slice(MON_LONG[(m - 1) as usize].as_bytes()),
                Tok::AmPm => out.extend_from_slice(if hh < 12 { b"AM" } else { b"PM" }),
                Tok::AmPmLower => out.extend_from_slice(if hh < 12 { b"am" } else { b"pm" }),
                Tok::TzOffset => write_offset(out, zone.off, false),
                Tok::TzName => out.extend_from_slice(zone.name()),
                Tok::Flagged(f) => {
                    let at = out.len();
                    self.write_toks(std::slice::from_ref(&f.0), unix_ns, zone, out);
                    f.1.apply(&f.0, out, at);
                }
            }
        }
    }
}

/// A conversion with strftime flags (`_-0^#`) or a field width, `rest` being what follows
/// its `%`: the token and the bytes it took, or None when `rest` has neither (Envoy's `%3f`
/// is a fraction, not a width). Flags on conversions glibc renders oddly (`%z`, `%Z`), on
/// Envoy's own (`%s`, `%f`) and on composite ones are refused rather than rendered differently.
fn flagged(fmt: &str, rest: &[u8]) -> Result<Option<(Tok, usize)>, String> {
    let mut f = Flags { pad: 0, upper: false, swap: false, width: 0 };
    let mut n = 0;
    while let Some(&c) = rest.get(n) {
        match c {
            b'-' | b'_' | b'0' => f.pad = c,
            b'^' => f.upper = true,
            b'#' => f.swap = true,
            _ => break,
        }
        n += 1;
    }
    let digits = rest[n..].iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 && (digits == 0 || rest.get(digits) == Some(&b'f')) {
        return Ok(None);
    }
    if digits > 0 {
        f.width = std::str::from_utf8(&rest[n..n + digits])
            .ok()
            .and_then(|w| w.parse().ok())
            .filter(|w| *w <= 1024)
            .ok_or_else(|| format!("time format {fmt:?}: a field width over 1024"))?;
        n += digits;
    }
    let tok = match rest.get(n) {
        Some(b'Y') => Tok::Year,
        Some(b'y') => Tok::Year2,
        Some(b'm') => Tok::Month,
        Some(b'd') => Tok::Day,
        Some(b'e') => Tok::DaySpace,
        Some(b'H') => Tok::Hour,
        Some(b'I') => Tok::Hour12,
        Some(b'M') => Tok::Min,
        Some(b'S') => Tok::Sec,
        Some(b'j') => Tok::DayOfYear,
        Some(b'u') => Tok::WeekdayIso,
        Some(b'w') => Tok::WeekdayNum,
        Some(b'V') => Tok::IsoWeek,
        Some(b'G') => Tok::IsoYear,
        Some(b'g') => Tok::IsoYear2,
        Some(b'U') => Tok::WeekSun,
        Some(b'W') => Tok::WeekMon,
        Some(b'C') => Tok::Century,
        Some(b'k') => Tok::HourSpace,
        Some(b'l') => Tok::Hour12Space,
        Some(b'a') => Tok::WeekdayShort,
        Some(b'A') => Tok::WeekdayLong,
        Some(b'b' | b'h') => Tok::MonthShort,
        Some(b'B') => Tok::MonthLong,
        Some(b'p') => Tok::AmPm,
        Some(b'P') => Tok::AmPmLower,
        // `%Z` with flags is not refused by Envoy, but glibc then names the process's local
        // zone even for UTC times (absl leaves `tm_zone` unset): not worth copying.
        _ => {
            let shown = String::from_utf8_lossy(&rest[..(n + 1).min(rest.len())]).into_owned();
            return Err(format!("time format {fmt:?}: flags or a width are not supported on \"%{shown}\""));
        }
    };
    Ok(Some((Tok::Flagged(Box::new((tok, f))), n + 1)))
}

/// `+hhmm` (`%z`) or `+hh:mm` (`%Ez`), as absl prints an offset.
fn write_offset(out: &mut Vec<u8>, off: i64, colon: bool) {
    out.push(if off < 0 { b'-' } else { b'+' });
    let m = off.unsigned_abs() / 60;
    pad(out, m / 60, 2);
    if colon {
        out.push(b':');
    }
    pad(out, m % 60, 2);
}

fn pad(out: &mut Vec<u8>, v: u64, width: usize) {
    // The common widths without itoa's general path.
    match (width, v) {
        (2, 0..=99) => return out.extend_from_slice(&[b'0' + (v / 10) as u8, b'0' + (v % 10) as u8]),
        (4, 0..=9999) => {
            let v = v as u16;
            return out.extend_from_slice(&[
                b'0' + (v / 1000) as u8,
                b'0' + (v / 100 % 10) as u8,
                b'0' + (v / 10 % 10) as u8,
                b'0' + (v % 10) as u8,
            ]);
        }
        _ => {}
    }
    let mut b = itoa::Buffer::new();
    let s = b.format(v);
    for _ in s.len()..width {
        out.push(b'0');
    }
    out.extend_from_slice(s.as_bytes());
}

fn frac(out: &mut Vec<u8>, nanos: u32, digits: u8) {
    const DIV: [u32; 10] = [1_000_000_000, 100_000_000, 10_000_000, 1_000_000, 100_000, 10_000, 1_000, 100, 10, 1];
    let digits = digits.clamp(1, 9) as usize;
    // Keep the leading `digits` digits of the 9-digit fraction (truncating, like Envoy).
    let mut n = nanos.min(999_999_999) / DIV[digits];
    let mut buf = [b'0'; 9];
    for i in (0..digits).rev() {
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&buf[..digits]);
}

/// The fraction's digits without trailing zeros ("0" when zero); with `dot`, after a point,
/// and nothing at all when zero (absl's `%E*S`).
fn frac_trim(out: &mut Vec<u8>, nanos: u32, dot: bool) {
    let mut buf = [b'0'; 9];
    let mut n = nanos.min(999_999_999);
    for i in (0..9).rev() {
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let len = buf.iter().rposition(|&c| c != b'0').map_or(0, |i| i + 1);
    match (len, dot) {
        (0, true) => {}
        (0, false) => out.push(b'0'),
        (_, true) => {
            out.push(b'.');
            out.extend_from_slice(&buf[..len]);
        }
        (_, false) => out.extend_from_slice(&buf[..len]),
    }
}

/// ISO 8601 (week-based year, week number) of the day `days` after 1970-01-01, in year `y`.
fn iso_week(days: i64, y: i64) -> (i64, u32) {
    let weeks_in = |y: i64| {
        let jan1 = (weekday(days_from_civil(y, 1, 1)) + 6) % 7 + 1;
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        if jan1 == 4 || (leap && jan1 == 3) {
            53
        } else {
            52
        }
    };
    let wd = ((weekday(days) + 6) % 7 + 1) as i64;
    let doy = days - days_from_civil(y, 1, 1) + 1;
    let w = (doy - wd + 10) / 7;
    if w < 1 {
        (y - 1, weeks_in(y - 1))
    } else if w > weeks_in(y) as i64 {
        (y + 1, 1)
    } else {
        (y, w as u32)
    }
}

fn weekday(days: i64) -> usize {
    // 1970-01-01 was a Thursday.
    (days + 4).rem_euclid(7) as usize
}

/// Howard Hinnant's days -> (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(f: &str, ns: i64) -> String {
        let mut out = Vec::new();
        TimeFormat::compile(f).unwrap_or_else(|e| panic!("{e}")).write(ns, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Every conversion beside strftime's basics, as Envoy 1.40 printed it for the same start
    /// time (2026-11-24 05:24:30.338772 UTC, a Tuesday).
    #[test]
    fn conversions_print_what_envoy_prints() {
        let ns = 1_795_497_870_338_772_000;
        for (spec, envoy) in [
            ("%E*S", "30.338772"),
            ("%*f", "338772"),
            ("%E*f", "338772"),
            ("%E3f", "338"),
            ("%E4S", "30.3387"),
            ("%Ez", "+00:00"),
            ("%c", "Tue Nov 24 05:24:30 2026"),
            ("%u", "2"),
            ("%w", "2"),
            ("%V", "48"),
            ("%G", "2026"),
            ("%g", "26"),
            ("%U", "47"),
            ("%W", "47"),
            ("%C", "20"),
            ("%k", " 5"),
            ("%l", " 5"),
            ("%r", "05:24:30 AM"),
            ("%x", "11/24/26"),
            ("%X", "05:24:30"),
            ("%Ey", "26"),
            ("%EY", "2026"),
            ("%Od", "24"),
        ] {
            assert_eq!(fmt(spec, ns), envoy, "{spec}");
        }
        // A whole second: %E*S has no point, %*f a single zero.
        assert_eq!(
            (fmt("%E*S", 1_795_497_870_000_000_000), fmt("%*f", 1_795_497_870_000_000_000)),
            ("30".into(), "0".into())
        );
        assert!(TimeFormat::compile("%H%n").is_err(), "Envoy rejects a newline");
    }

    #[test]
    fn iso_and_week_numbers_at_year_edges() {
        let day = |y, m, d| days_from_civil(y, m, d) * 86_400 * 1_000_000_000;
        // 2021-01-01 (a Friday) is in week 53 of 2020; 2024-12-30 (a Monday) in week 1 of 2025.
        assert_eq!(fmt("%G-W%V-%u", day(2021, 1, 1)), "2020-W53-5");
        assert_eq!(fmt("%G-W%V-%u", day(2024, 12, 30)), "2025-W01-1");
        // 2023-01-01 is a Sunday: week 1 when weeks start on Sunday, week 0 when on Monday.
        assert_eq!(fmt("%U %W %w", day(2023, 1, 1)), "01 00 0");
    }

    #[test]
    fn envoy_default_and_extensions() {
        // 2026-11-23T19:43:23.304Z as printed by Envoy 1.40 for the same instant.
        let ns = 1_795_463_003_304_123_456;
        assert_eq!(fmt(DEFAULT, ns), "2026-11-23T19:43:23.304Z");
        assert_eq!(fmt("%s", ns), "1795463003");
        assert_eq!(fmt("%Y/%m/%d %H:%M:%S.%3f %z", ns), "2026/11/23 19:43:23.304 +0000");
        assert_eq!(fmt("%f|%6f|%E6S", ns), "304123456|304123|23.304123");
        assert_eq!(fmt("%a %b %e %j %p %I %%", ns), "Mon Nov 23 327 PM 07 %");
        assert_eq!(fmt("%F %T", 0), "1970-01-01 00:00:00");
        assert_eq!(fmt("%F", 951_782_400_000_000_000), "2000-02-29");
    }

    #[test]
    fn cached_prefix_matches_uncached_rendering() {
        // Mixed tails, and fraction-only tails (the fast path, Envoy's default among them).
        for (spec, fast) in
            [("%Y-%m-%dT%H:%M:%E3SZ|%s|%F %T.%6f", false), (DEFAULT, true), ("%T.%9f", true), ("%E1S", true)]
        {
            let f = TimeFormat::compile(spec).unwrap();
            assert_eq!(f.frac_tail, fast, "{spec}");
            for start in [1_795_463_003_304_123_456i64, -1_000_000_001] {
                let mut ns = start;
                for _ in 0..5000 {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    f.write(ns, &mut a);
                    f.write_toks(&f.toks, ns, Zone::UTC, &mut b);
                    assert_eq!(a, b, "{spec} at {ns}");
                    ns += 997_000_001; // crosses seconds, minutes and days
                }
            }
        }
    }

    #[test]
    fn zones_shift_the_wall_clock_but_not_the_epoch() {
        let ns = 1_795_463_003_304_123_456; // 2026-11-23T19:43:23.304Z
        let mut est = Zone { off: -5 * 3600, name: [0; 15], name_len: 3 };
        est.name[..3].copy_from_slice(b"EST");
        let mut ist = Zone { off: 5 * 3600 + 1800, ..est };
        ist.name[..3].copy_from_slice(b"IST");
        let f = TimeFormat::compile(&format!("{DEFAULT_LOCAL}|%Ez|%Z|%s|%F")).unwrap();
        let render = |z: Zone| {
            let mut out = Vec::new();
            f.write_toks(&f.toks, ns, z, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(render(est), "2026-11-23T14:43:23.304-0500|-05:00|EST|1795463003|2026-11-23");
        assert_eq!(render(ist), "2026-11-24T01:13:23.304+0530|+05:30|IST|1795463003|2026-11-24");
        assert_eq!(render(Zone::UTC), "2026-11-23T19:43:23.304+0000|+00:00|UTC|1795463003|2026-11-23");
        // The local default renders the process's zone; this test's process runs in UTC
        // unless TZ says otherwise, so only the shape is checked.
        let mut out = Vec::new();
        TimeFormat::compile(DEFAULT_LOCAL).unwrap().local().write(ns, &mut out);
        assert_eq!(out.len(), "2026-11-23T19:43:23.304+0000".len(), "{}", String::from_utf8_lossy(&out));
    }

    /// strftime's flags and widths as Envoy 1.40 printed them for 2026-11-25 03:31 UTC (2,081
    /// combinations of 13 flag sets, 6 widths and 26 conversions matched it in one run); here
    /// a sample, with single digits and zeros, which that instant did not have.
    #[test]
    fn flags_and_widths_print_what_envoy_prints() {
        let ns = 1_795_577_493_558_656_000; // Wed 2026-11-25 03:31:33 UTC
        for (spec, envoy) in [
            ("%-H", "3"),
            ("%_H", " 3"),
            ("%0k", "03"),
            ("%#k", " 3"),
            ("%1H", "03"),
            ("%3d", "025"),
            ("%_3d", " 25"),
            ("%-10d", "        25"),
            ("%10k", "         3"),
            ("%0_H", " 3"),
            ("%_0H", "03"),
            ("%3Y", "2026"),
            ("%_10Y", "      2026"),
            ("%03u", "003"),
            ("%^a", "WED"),
            ("%#A", "WEDNESDAY"),
            ("%-^b", "NOV"),
            ("%010a", "0000000Wed"),
            ("%0_10a", "       Wed"),
            ("%#p", "am"),
            ("%^P", "am"),
            ("%03p", "0AM"),
            ("%^#p", "am"),
            ("%-d/%-m %-I:%M %P", "25/11 3:31 am"),
        ] {
            assert_eq!(fmt(spec, ns), envoy, "{spec}");
        }
        // Zeros keep one digit; a value of 10 loses no zero of its own.
        let midnight = 1_795_564_800_000_000_000; // 2026-11-25 00:00:00
        assert_eq!(fmt("%-H:%-M:%-S %_M %-I", midnight), "0:0:0  0 12");
        assert_eq!(fmt("%-d %-m", midnight - 86_400 * 1_000_000_000 * 15), "10 11");
        for refused in ["%-z", "%^Z", "%-s", "%_3f", "%-F", "%-Ey", "%2000d"] {
            assert!(TimeFormat::compile(refused).is_err(), "{refused}");
        }
        assert_eq!(fmt("%3f|%E3S", ns), "558|33.558", "Envoy's own digits are not widths");
    }

    #[test]
    fn unsupported_conversion_is_named() {
        let e = TimeFormat::compile("%Y %Q").unwrap_err();
        assert!(e.contains("%Q"), "{e}");
        assert!(TimeFormat::compile("abc %").is_err());
    }
}
