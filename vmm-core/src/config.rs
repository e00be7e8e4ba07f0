//! The VM described as data: [`VmConfig`].
//!
//! The command line (`bulkhead run ...`), the configuration file (`--config-file`, Firecracker's
//! schema) and the API (`PUT /boot-source`, `PUT /drives/{id}`, ...) all build a `VmConfig`;
//! [`VmConfig::validate`] checks it once, before anything is created. No clap type and no file
//! descriptor lives here: the running VM (`crate::vmm`) opens what the description names.
//!
//! The serialised form is Firecracker's (`GET /vm/config` answers with it, and a Firecracker
//! configuration file deserialises into it): the top-level keys are `boot-source`,
//! `machine-config`, `drives`, `network-interfaces`, `logger` and `metrics`; Bulkhead's own
//! settings (console, supervision, faults, sandbox) live under `bulkhead`. Firecracker devices
//! Bulkhead does not have yet (`vsock`, `balloon`, `entropy`, ...) are accepted only as `null`,
//! and refused with a message saying so otherwise.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipc::control::{ErrorPolicy, ForbiddenAction, RateLimit};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::faults::FaultSchedule;

/// Errors in a VM description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// JSON that does not fit the schema.
    #[error("An error occurred when deserializing the json body of a request: {0}")]
    Json(String),
    /// No boot source was given.
    #[error("no boot source: the kernel image path is missing")]
    NoBootSource,
    /// An empty kernel path.
    #[error("the kernel image path is empty")]
    EmptyKernelPath,
    /// The kernel command line is too long.
    #[error("the kernel command line is {0} bytes (at most {max})", max = MAX_CMDLINE)]
    CmdlineTooLong(usize),
    /// vCPU count out of range.
    #[error("vcpu_count must be 1 to {MAX_VCPUS}, not {0}")]
    VcpuCount(u64),
    /// SMT with an odd vCPU count.
    #[error("with smt enabled, vcpu_count must be 1 or even, not {0}")]
    SmtOddVcpus(u8),
    /// Memory size out of range.
    #[error("mem_size_mib must be 1 to {MAX_MEM_MIB}, not {0}")]
    MemSize(u64),
    /// A feature of Firecracker's schema Bulkhead does not have.
    #[error("{0} is not supported yet")]
    Unsupported(String),
    /// A malformed id (drive, interface).
    #[error("invalid {kind} id `{id}`: 1 to {max} of [A-Za-z0-9_]")]
    BadId {
        /// What kind of id.
        kind: &'static str,
        /// The id.
        id: String,
        /// Longest accepted.
        max: usize,
    },
    /// Two devices with one id.
    #[error("{kind} id `{id}` is used twice")]
    DuplicateId {
        /// What kind of id.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The id in the body differs from the one in the path.
    #[error("the id in the request body (`{body}`) differs from the one in the path (`{path}`)")]
    IdMismatch {
        /// From the path.
        path: String,
        /// From the body.
        body: String,
    },
    /// More than one root device.
    #[error("a root block device already exists: `{0}`")]
    SecondRoot(String),
    /// A drive without a backing file.
    #[error("drive `{0}` has no path_on_host (vhost-user drives are not supported)")]
    NoDrivePath(String),
    /// A bad TAP name.
    #[error("invalid host_dev_name `{0}`: 1 to {max} bytes, no '/' or white space", max = crate::tap::MAX_NAME)]
    BadTapName(String),
    /// Two interfaces on one TAP.
    #[error("host_dev_name `{0}` is used by two network interfaces")]
    DuplicateTap(String),
    /// Two interfaces with one MAC.
    #[error("guest_mac {0} is used by two network interfaces")]
    DuplicateMac(MacAddr),
    /// A bad token bucket.
    #[error("invalid rate limiter: {0}")]
    RateLimiter(String),
    /// A fault or injection names a device the VM does not have.
    #[error("{what} names device `{device}`, which this VM does not have (have: {have})")]
    UnknownDevice {
        /// The schedule or injection.
        what: String,
        /// The device named.
        device: String,
        /// The devices there are.
        have: String,
    },
    /// Something else that is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Most vCPUs.
pub const MAX_VCPUS: u8 = 32;
/// Most guest RAM in MiB (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Longest kernel command line (Linux's x86 `COMMAND_LINE_SIZE`).
pub const MAX_CMDLINE: usize = 2048;
/// Longest drive or interface id.
pub const MAX_ID: usize = 64;
/// Longest disk serial a guest can read with virtio-blk's GET_ID.
pub const DISK_SERIAL_MAX: usize = 20;
/// The kernel command line when none is given.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// `[A-Za-z0-9_]+`, at most [`MAX_ID`] bytes: Firecracker's rule for drive and interface ids.
pub fn check_id(kind: &'static str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > MAX_ID || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ConfigError::BadId { kind, id: id.to_string(), max: MAX_ID });
    }
    Ok(())
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// An ELF vmlinux or a bzImage.
    pub kernel_image_path: PathBuf,
    /// An initial RAM disk.
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line ([`DEFAULT_BOOT_ARGS`] when absent).
    #[serde(default)]
    pub boot_args: Option<String>,
}

impl BootSource {
    /// The command line the kernel gets before Bulkhead adds its own words.
    pub fn boot_args(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
    }
}

/// Firecracker's `huge_pages`: only `None` is supported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal 4 KiB pages.
    #[default]
    None,
    /// 2 MiB pages (refused by validation).
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /machine-config` (and the `machine-config` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading as the guest sees it.
    #[serde(default)]
    pub smt: bool,
    /// Track dirty pages (for snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Backing page size.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Firecracker's deprecated static CPU templates (firecracker-containerd sends `T2` on Intel
    /// hosts): accepted and shown back, but not applied; the start-up log says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// See [`MachineConfig::vcpu_count`].
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// See [`MachineConfig::mem_size_mib`].
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    /// See [`MachineConfig::smt`].
    #[serde(default)]
    pub smt: Option<bool>,
    /// See [`MachineConfig::track_dirty_pages`].
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// See [`MachineConfig::huge_pages`].
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
    /// See [`MachineConfig::cpu_template`].
    #[serde(default)]
    pub cpu_template: Option<String>,
}

impl MachineConfig {
    /// This configuration with `update` applied.
    pub fn updated(&self, update: &MachineConfigUpdate) -> Self {
        Self {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: update.huge_pages.unwrap_or(self.huge_pages),
            cpu_template: update.cpu_template.clone().or_else(|| self.cpu_template.clone()),
        }
    }

    /// Checks the ranges and the combinations Bulkhead supports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(u64::from(self.vcpu_count)));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(ConfigError::SmtOddVcpus(self.vcpu_count));
        }
        if self.mem_size_mib == 0 || self.mem_size_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemSize(self.mem_size_mib));
        }
        if self.huge_pages != HugePages::None {
            return Err(ConfigError::Unsupported("huge_pages other than \"None\"".into()));
        }
        Ok(())
    }
}

/// Firecracker's token bucket: `size` tokens, refilled completely every `refill_time` ms, plus
/// `one_time_burst` tokens available once at the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket size (bytes or operations).
    pub size: u64,
    /// Extra tokens available once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the whole bucket.
    pub refill_time: u64,
}

/// Largest bucket size or rate accepted (bytes or operations): 1 TiB.
pub const RATE_MAX: u64 = 1 << 40;

impl TokenBucketConfig {
    /// A bucket for `rate` tokens per second holding `burst` (0: 10 ms worth, at least 1). The
    /// refill time is whole milliseconds, so the rate it gives back is within 1 % of `rate`
    /// when the bucket holds 50 ms or more of it, and exact when `rate` divides `burst × 1000`.
    pub fn from_rate(rate: u64, burst: u64) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let size = if burst == 0 { (rate / 100).max(1) } else { burst };
        // refill_time = size / rate seconds, in whole ms (at least 1), rounded to nearest.
        let refill_time = ((u128::from(size) * 1000 + u128::from(rate) / 2) / u128::from(rate)).max(1);
        Some(Self { size, one_time_burst: None, refill_time: u64::try_from(refill_time).unwrap_or(u64::MAX) })
    }

    /// Tokens per second (size over refill time, rounded to nearest), or an error for a bucket
    /// that cannot work. A size of 0 means no limit, as in Firecracker.
    pub fn rate(&self) -> Result<u64, ConfigError> {
        if self.size == 0 {
            return Ok(0);
        }
        if self.refill_time == 0 {
            return Err(ConfigError::RateLimiter("refill_time must be at least 1 ms".into()));
        }
        if self.size > RATE_MAX || self.one_time_burst.is_some_and(|b| b > RATE_MAX) {
            return Err(ConfigError::RateLimiter(format!("bucket sizes above {RATE_MAX} are not accepted")));
        }
        let rate = (u128::from(self.size) * 1000 + u128::from(self.refill_time) / 2) / u128::from(self.refill_time);
        Ok(u64::try_from(rate).unwrap_or(u64::MAX).max(1))
    }
}

/// Firecracker's rate limiter: a byte bucket and an operation bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations: block requests or network frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// The limiter for `limit` (what the command line's `bw=`, `ops=`/`pps=` give).
    pub fn from_rate_limit(limit: &RateLimit) -> Option<Self> {
        let cfg = Self {
            bandwidth: TokenBucketConfig::from_rate(limit.bytes_per_sec, limit.bytes_burst),
            ops: TokenBucketConfig::from_rate(limit.ops_per_sec, limit.ops_burst),
        };
        (cfg != Self::default()).then_some(cfg)
    }

    /// What the services enforce: rates and bucket sizes (a one-time burst adds to the first
    /// fill of the bucket).
    pub fn to_rate_limit(&self) -> Result<RateLimit, ConfigError> {
        let mut limit = RateLimit::default();
        if let Some(b) = &self.bandwidth {
            limit.bytes_per_sec = b.rate()?;
            limit.bytes_burst = if limit.bytes_per_sec == 0 { 0 } else { b.size };
            limit.bytes_one_time = b.one_time_burst.unwrap_or(0);
        }
        if let Some(o) = &self.ops {
            limit.ops_per_sec = o.rate()?;
            limit.ops_burst = if limit.ops_per_sec == 0 { 0 } else { o.size };
            limit.ops_one_time = o.one_time_burst.unwrap_or(0);
        }
        Ok(limit)
    }
}

/// Firecracker's `cache_type`: how FLUSH is honoured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Firecracker ignores flushes; Bulkhead always honours them (fdatasync), which is safer.
    #[default]
    Unsafe,
    /// Flushes reach the host's storage.
    Writeback,
}

/// `PUT /drives/{id}` (and each entry of `drives`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// `[A-Za-z0-9_]+`; also the disk's serial (GET_ID), cut to 20 bytes.
    pub drive_id: String,
    /// The raw image.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// The guest's root file system: Bulkhead puts it first (`/dev/vda`) and adds `root=` to the
    /// command line, as Firecracker does.
    #[serde(default)]
    pub is_root_device: bool,
    /// The guest cannot write.
    #[serde(default)]
    pub is_read_only: Option<bool>,
    /// Root by partition UUID instead of `/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// How FLUSH is honoured.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Bytes and requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Firecracker's I/O engine: `Sync` (what Bulkhead does) is accepted, `Async` refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Firecracker's vhost-user socket: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// What a host error on a write, flush or discard does (`report`, `stop`, `enospc`), as
    /// QEMU's `werror`. A Bulkhead extension.
    #[serde(default, skip_serializing_if = "is_report")]
    pub werror: ErrorPolicy,
    /// What a host error on a read does, as QEMU's `rerror`. A Bulkhead extension.
    #[serde(default, skip_serializing_if = "is_report")]
    pub rerror: ErrorPolicy,
}

fn is_report(p: &ErrorPolicy) -> bool {
    *p == ErrorPolicy::Report
}

impl DriveConfig {
    /// Whether the guest may not write.
    pub fn read_only(&self) -> bool {
        self.is_read_only.unwrap_or(false)
    }

    /// The serial the guest reads with GET_ID: the id, cut to what virtio-blk can return.
    pub fn serial(&self) -> String {
        self.drive_id.chars().take(DISK_SERIAL_MAX).collect()
    }

    /// Checks the drive on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("drive", &self.drive_id)?;
        if self.socket.is_some() {
            return Err(ConfigError::Unsupported("vhost-user block devices (socket)".into()));
        }
        if self.path_on_host.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::NoDrivePath(self.drive_id.clone()));
        }
        if self.io_engine.as_deref().is_some_and(|e| e != "Sync") {
            return Err(ConfigError::Unsupported("io_engine other than \"Sync\"".into()));
        }
        if let Some(r) = &self.rate_limiter {
            r.to_rate_limit()?;
        }
        Ok(())
    }
}

/// `PATCH /drives/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// Must equal the path's id.
    pub drive_id: String,
    /// A new backing file: the guest sees a media change.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// A new rate limiter, applied live.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A MAC address (`aa:bb:cc:dd:ee:ff` in JSON).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast (and broadcast) and all-zero addresses.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad MAC address `{s}` (expected six hex bytes like 02:00:00:00:00:01)");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!("MAC address `{s}` is a multicast address"));
        }
        if mac == [0; 6] {
            return Err(format!("MAC address `{s}` is all zeros"));
        }
        Ok(Self(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `PUT /network-interfaces/{id}` (and each entry of `network-interfaces`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// `[A-Za-z0-9_]+`.
    pub iface_id: String,
    /// The TAP (opened, or created when missing).
    pub host_dev_name: String,
    /// The guest's MAC (default: locally administered, from the core's pid and the index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// Frames arriving for the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Frames the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterface {
    /// Checks the interface on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("network interface", &self.iface_id)?;
        check_tap_name(&self.host_dev_name)?;
        for r in [&self.rx_rate_limiter, &self.tx_rate_limiter].into_iter().flatten() {
            r.to_rate_limit()?;
        }
        Ok(())
    }
}

/// A TAP name the kernel accepts.
pub fn check_tap_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > crate::tap::MAX_NAME
        || name.contains('/')
        || name.contains(char::is_whitespace)
        || name == "."
        || name == ".."
    {
        return Err(ConfigError::BadTapName(name.to_string()));
    }
    Ok(())
}

/// `PATCH /network-interfaces/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// Must equal the path's id.
    pub iface_id: String,
    /// New receive limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New transmit limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Firecracker's log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and worse.
    Warning,
    /// Information and worse.
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// As a `log` filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Off => log::LevelFilter::Off,
            Self::Error => log::LevelFilter::Error,
            Self::Warning => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file or FIFO the log goes to (stderr when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// The level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level on each line (Bulkhead always does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print the source location on each line (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only this module's lines (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file or FIFO that gets one JSON line per flush.
    pub metrics_path: PathBuf,
}

/// Where the guest's serial console goes and comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// `stdout` or a path: a FIFO, a character device, or a regular file the core creates. An
    /// existing non-empty regular file is refused unless `append` is set, and a file that is a
    /// disk image (of this VM or another) always is.
    #[serde(default = "stdout")]
    pub output: String,
    /// `stdin` or `none`.
    #[serde(default = "stdin")]
    pub input: String,
    /// Append to an existing output file instead of refusing it.
    #[serde(default)]
    pub append: bool,
}

fn stdout() -> String {
    "stdout".into()
}

fn stdin() -> String {
    "stdin".into()
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self { output: stdout(), input: stdin(), append: false }
    }
}

/// `N` restarts per `SECS` seconds, written `N/SECS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartCap {
    /// Most restarts in the window (0: never restart, the device fails closed at once).
    pub max: u32,
    /// The window.
    pub window: Duration,
}

impl RestartCap {
    /// Parses `N/SECS` (or `N`, with a 10 s window).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (n, secs) = s.split_once('/').unwrap_or((s, "10"));
        let max: u32 = n.parse().map_err(|_| format!("bad restart count `{n}` (expected N/SECS, e.g. 20/10)"))?;
        let secs: u64 = secs.parse().map_err(|_| format!("bad window `{secs}` (seconds)"))?;
        if !(1..=86_400).contains(&secs) || max > 1_000_000 {
            return Err("expected N ≤ 1000000 restarts per 1 to 86400 s".into());
        }
        Ok(Self { max, window: Duration::from_secs(secs) })
    }
}

impl fmt::Display for RestartCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.max, self.window.as_secs())
    }
}

/// Serde through the string form (`FromStr`-like parser and `Display`).
macro_rules! serde_as_string {
    ($t:ty, $parse:path) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(RestartCap, RestartCap::parse);
serde_as_string!(FaultSchedule, FaultSchedule::parse);
serde_as_string!(InjectSpec, InjectSpec::parse);

/// How the supervisor watches and restarts services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Longest wait for a service's answer to a forwarded exit (ms).
    #[serde(default = "default_deadline")]
    pub service_deadline_ms: u64,
    /// Liveness ping interval (ms; 0: off).
    #[serde(default = "default_liveness")]
    pub service_liveness_ms: u64,
    /// Longest one I/O call of a service may take before it counts as hung (ms).
    #[serde(default = "default_io_deadline")]
    pub service_io_deadline_ms: u64,
    /// Restart cap per service.
    #[serde(default = "default_restart_max")]
    pub restart_max: RestartCap,
    /// Restarts tolerated before backing off.
    #[serde(default = "default_restart_burst")]
    pub restart_burst: RestartCap,
}

fn default_deadline() -> u64 {
    1000
}

fn default_liveness() -> u64 {
    250
}

fn default_io_deadline() -> u64 {
    30_000
}

fn default_restart_max() -> RestartCap {
    RestartCap { max: 20, window: Duration::from_secs(10) }
}

fn default_restart_burst() -> RestartCap {
    RestartCap { max: 3, window: Duration::from_secs(1) }
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            service_deadline_ms: default_deadline(),
            service_liveness_ms: default_liveness(),
            service_io_deadline_ms: default_io_deadline(),
            restart_max: default_restart_max(),
            restart_burst: default_restart_burst(),
        }
    }
}

impl SupervisionConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=600_000).contains(&self.service_deadline_ms) {
            return Err(ConfigError::Invalid("service_deadline_ms must be 1 to 600000".into()));
        }
        if self.service_liveness_ms > 600_000 {
            return Err(ConfigError::Invalid("service_liveness_ms must be at most 600000".into()));
        }
        if !(1..=3_600_000).contains(&self.service_io_deadline_ms) {
            return Err(ConfigError::Invalid("service_io_deadline_ms must be 1 to 3600000".into()));
        }
        Ok(())
    }
}

/// Which service an injected forbidden action goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSpec {
    /// The device, as a user names it (`console`, `block`, `blockN`, `net`, `netN`, an id).
    pub device: String,
    /// What it is told to attempt.
    pub action: ForbiddenAction,
    /// How long after the vCPUs start.
    pub delay: Duration,
}

impl InjectSpec {
    /// The action names, for messages.
    pub const ACTIONS: &'static str = "open-host-file, execve, inet-socket, ptrace, mount, write-outside-root";

    /// Parses `DEVICE:ACTION@MS`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (device, rest) = s.split_once(':').ok_or("expected SERVICE:ACTION@MS")?;
        let (action, ms) = rest.split_once('@').ok_or("expected SERVICE:ACTION@MS")?;
        if device.is_empty() || !device.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("bad service `{device}` (console, block, blockN, net, netN or a device id)"));
        }
        let action =
            forbidden_action(action).ok_or_else(|| format!("unknown action `{action}` ({})", Self::ACTIONS))?;
        let ms: u64 = ms.parse().map_err(|_| format!("bad delay `{ms}` (milliseconds)"))?;
        if ms > 3_600_000 {
            return Err("delay above one hour".into());
        }
        Ok(Self { device: device.to_string(), action, delay: Duration::from_millis(ms) })
    }
}

fn forbidden_action(s: &str) -> Option<ForbiddenAction> {
    Some(match s {
        "open-host-file" => ForbiddenAction::OpenHostFile,
        "execve" => ForbiddenAction::Execve,
        "inet-socket" => ForbiddenAction::InetSocket,
        "ptrace" => ForbiddenAction::Ptrace,
        "mount" => ForbiddenAction::Mount,
        "write-outside-root" => ForbiddenAction::WriteOutsideRoot,
        "signal-all" => ForbiddenAction::SignalAll,
        _ => return None,
    })
}

fn forbidden_action_name(a: ForbiddenAction) -> &'static str {
    match a {
        ForbiddenAction::OpenHostFile => "open-host-file",
        ForbiddenAction::Execve => "execve",
        ForbiddenAction::InetSocket => "inet-socket",
        ForbiddenAction::Ptrace => "ptrace",
        ForbiddenAction::Mount => "mount",
        ForbiddenAction::WriteOutsideRoot => "write-outside-root",
        ForbiddenAction::SignalAll => "signal-all",
    }
}

impl fmt::Display for InjectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@{}", self.device, forbidden_action_name(self.action), self.delay.as_millis())
    }
}

/// Bulkhead's own settings (the `bulkhead` section of a configuration file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkheadConfig {
    /// The serial console.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Supervision of the services.
    #[serde(default)]
    pub supervision: SupervisionConfig,
    /// Fault schedules (`DEVICE:ACTION[,after=DUR][,every=DUR][,count=N]`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultSchedule>,
    /// Forbidden actions services are told to attempt (`DEVICE:ACTION@MS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_forbidden: Vec<InjectSpec>,
    /// Where the service binaries are (default: next to `bulkhead`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_dir: Option<PathBuf>,
    /// Start services without the namespaces this host cannot create (INSECURE).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_no_sandbox: bool,
    /// Accept fault injection over the API (`PUT /bulkhead/devices/{id}/fault`, `bulkhead
    /// fault`). Off by default: whoever can reach the socket could otherwise crash or corrupt
    /// the VM's devices on purpose. Schedules given at start (`faults`) are the operator's own
    /// and need no permission.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_faults: bool,
    /// The VM's cgroup: where, and what it may use.
    #[serde(default, skip_serializing_if = "CgroupConfig::is_default")]
    pub cgroup: CgroupConfig,
    /// The core's jail: its ids, or none.
    #[serde(default, skip_serializing_if = "crate::jail::JailConfig::is_default")]
    pub jail: crate::jail::JailConfig,
}

/// The VM's cgroup ([`crate::cgroup`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupConfig {
    /// No cgroup for this VM (it then shares its parent's, unbounded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Where to create it, a path inside each hierarchy (default: the cgroup `bulkhead`
    /// started in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its settings.
    #[serde(default)]
    pub resources: crate::cgroup::Resources,
}

impl CgroupConfig {
    /// Whether nothing is set (then it is left out of a serialized configuration).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A whole VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel, initrd and command line.
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Block devices, in the order the guest sees them (the root device first).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network devices, after the block devices in the address map.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The VMM's log.
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    /// The metrics file.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Bulkhead's own settings.
    #[serde(default)]
    pub bulkhead: BulkheadConfig,
    // Firecracker's sections for devices Bulkhead does not have: present (as `null`) so that a
    // configuration Firecracker wrote reads back, refused when set. (Inline rather than a
    // flattened struct: serde cannot deny unknown fields next to a flattened one.)
    /// virtio-vsock (not supported yet).
    #[serde(default)]
    pub vsock: Option<serde_json::Value>,
    /// virtio-balloon (not supported yet).
    #[serde(default)]
    pub balloon: Option<serde_json::Value>,
    /// virtio-rng (not supported yet).
    #[serde(default)]
    pub entropy: Option<serde_json::Value>,
    /// The MMDS (not planned).
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<serde_json::Value>,
    /// Custom CPU templates (not supported).
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
}

impl VmConfig {
    fn validate_unsupported(&self) -> Result<(), ConfigError> {
        let set = |v: &Option<serde_json::Value>| v.as_ref().is_some_and(|v| !v.is_null());
        for (name, v) in [
            ("vsock", &self.vsock),
            ("balloon", &self.balloon),
            ("entropy", &self.entropy),
            ("mmds-config (the MMDS is not planned)", &self.mmds_config),
            ("cpu-config", &self.cpu_config),
        ] {
            if set(v) {
                return Err(ConfigError::Unsupported(name.to_string()));
            }
        }
        Ok(())
    }
}

/// How a device is named in faults, injections, the API and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceKind {
    /// The serial console.
    Console,
    /// A virtio-blk drive.
    Block,
    /// A virtio-net interface.
    Net,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Console => "console",
            Self::Block => "block",
            Self::Net => "net",
        })
    }
}

/// A device of the VM, as the core numbers them: the console is 0, then the drives in order, then
/// the network interfaces. Assigned once from the [`VmConfig`]; every lookup by a user's name goes
/// through [`DevicePlan::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One device in a [`DevicePlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDevice {
    /// The core's id.
    pub id: DeviceId,
    /// What it is.
    pub kind: DeviceKind,
    /// Its index among the devices of its kind.
    pub index: usize,
    /// The user's id: `console`, the `drive_id` or the `iface_id`.
    pub user_id: String,
    /// The service instance name (`console`, `block-ID`, `net-ID`), for logs.
    pub service: String,
}

/// The devices a [`VmConfig`] describes, with their ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    devices: Vec<PlannedDevice>,
}

impl DevicePlan {
    /// Numbers the devices of `cfg`.
    pub fn new(cfg: &VmConfig) -> Self {
        let mut devices = vec![PlannedDevice {
            id: DeviceId(0),
            kind: DeviceKind::Console,
            index: 0,
            user_id: "console".into(),
            service: "console".into(),
        }];
        let mut push = |kind, index, user_id: &str, service: String| {
            let id = DeviceId(u32::try_from(devices.len()).unwrap_or(u32::MAX));
            devices.push(PlannedDevice { id, kind, index, user_id: user_id.to_string(), service });
        };
        for (i, d) in cfg.drives.iter().enumerate() {
            push(DeviceKind::Block, i, &d.drive_id, format!("block-{}", d.drive_id));
        }
        for (i, n) in cfg.network_interfaces.iter().enumerate() {
            push(DeviceKind::Net, i, &n.iface_id, format!("net-{}", n.iface_id));
        }
        Self { devices }
    }

    /// Every device, by id.
    pub fn devices(&self) -> &[PlannedDevice] {
        &self.devices
    }

    /// The device with this id.
    pub fn get(&self, id: DeviceId) -> Option<&PlannedDevice> {
        self.devices.get(usize::try_from(id.0).ok()?)
    }

    /// The device a user means by `name`: its id (`console`, a `drive_id`, an `iface_id`), its
    /// service's name (`block-ID`, `net-ID`), or its kind and index (`block`/`disk` for the first
    /// drive, `blockN`/`diskN`, `net`, `netN`). An exact id wins over a kind and index.
    pub fn resolve(&self, name: &str) -> Option<DeviceId> {
        if let Some(d) = self.devices.iter().find(|d| d.user_id == name || d.service == name) {
            return Some(d.id);
        }
        let (kind, rest) = if let Some(r) = name.strip_prefix("block").or_else(|| name.strip_prefix("disk")) {
            (DeviceKind::Block, r)
        } else if let Some(r) = name.strip_prefix("net") {
            (DeviceKind::Net, r)
        } else {
            return None;
        };
        let index: usize = if rest.is_empty() { 0 } else { rest.parse().ok()? };
        self.devices.iter().find(|d| d.kind == kind && d.index == index).map(|d| d.id)
    }

    /// The names [`resolve`](Self::resolve) accepts, for messages.
    pub fn names(&self) -> String {
        self.devices.iter().map(|d| d.user_id.as_str()).collect::<Vec<_>>().join(", ")
    }
}

impl VmConfig {
    /// Parses a configuration file or request body in Firecracker's schema.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// The JSON `GET /vm/config` answers with.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The devices and their ids.
    pub fn plan(&self) -> DevicePlan {
        DevicePlan::new(self)
    }

    /// Whether the guest's console input is the VMM's stdin.
    pub fn console_reads_stdin(&self) -> bool {
        self.bulkhead.console.input == "stdin"
    }

    /// Everything that can be checked without touching the host: present and in range, ids
    /// well-formed and unique, one root device at most, faults naming existing devices. The
    /// files (kernel, images, TAPs) are opened when the VM is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let boot = self.boot_source.as_ref().ok_or(ConfigError::NoBootSource)?;
        if boot.kernel_image_path.as_os_str().is_empty() {
            return Err(ConfigError::EmptyKernelPath);
        }
        if boot.boot_args().len() > MAX_CMDLINE {
            return Err(ConfigError::CmdlineTooLong(boot.boot_args().len()));
        }
        self.machine_config.validate()?;
        self.validate_unsupported()?;
        self.validate_devices()?;
        let c = &self.bulkhead.console;
        if c.output.is_empty() {
            return Err(ConfigError::Invalid("console output must be `stdout` or a path".into()));
        }
        if c.input != "stdin" && c.input != "none" {
            return Err(ConfigError::Invalid(format!("console input must be `stdin` or `none`, not `{}`", c.input)));
        }
        self.bulkhead.supervision.validate()?;
        self.bulkhead.jail.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let plan = self.plan();
        let unknown = |what: String, device: &str| ConfigError::UnknownDevice {
            what,
            device: device.to_string(),
            have: plan.names(),
        };
        for f in &self.bulkhead.faults {
            plan.resolve(&f.device).ok_or_else(|| unknown(format!("fault schedule `{f}`"), &f.device))?;
        }
        for i in &self.bulkhead.inject_forbidden {
            plan.resolve(&i.device).ok_or_else(|| unknown(format!("injection `{i}`"), &i.device))?;
        }
        Ok(())
    }

    /// The drive and interface checks of [`validate`](Self::validate), which also hold before
    /// a boot source is set (the API checks them on every `PUT`).
    pub fn validate_devices(&self) -> Result<(), ConfigError> {
        let mut ids = BTreeSet::new();
        let mut root: Option<&str> = None;
        for d in &self.drives {
            d.validate()?;
            if !ids.insert(d.drive_id.as_str()) {
                return Err(ConfigError::DuplicateId { kind: "drive", id: d.drive_id.clone() });
            }
            if d.is_root_device {
                if let Some(r) = root {
                    return Err(ConfigError::SecondRoot(r.to_string()));
                }
                root = Some(&d.drive_id);
            }
        }
        let (mut ids, mut taps, mut macs) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for n in &self.network_interfaces {
            n.validate()?;
            if !ids.insert(n.iface_id.as_str()) {
                return Err(ConfigError::DuplicateId { kind: "network interface", id: n.iface_id.clone() });
            }
            if !taps.insert(n.host_dev_name.as_str()) {
                return Err(ConfigError::DuplicateTap(n.host_dev_name.clone()));
            }
            if let Some(mac) = n.guest_mac {
                if !macs.insert(mac) {
                    return Err(ConfigError::DuplicateMac(mac));
                }
            }
        }
        Ok(())
    }

    /// Adds or replaces the drive with `drive.drive_id`, keeping the root device first (as
    /// Firecracker does, so that it is `/dev/vda`). Validates the result; on error nothing
    /// changes.
    pub fn put_drive(&mut self, drive: DriveConfig) -> Result<(), ConfigError> {
        let mut next = self.clone();
        match next.drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
            Some(d) => *d = drive,
            None => next.drives.push(drive),
        }
        next.drives.sort_by_key(|d| !d.is_root_device);
        next.validate_devices()?;
        *self = next;
        Ok(())
    }

    /// Adds or replaces the interface with `iface.iface_id`. On error nothing changes.
    pub fn put_network_interface(&mut self, iface: NetworkInterface) -> Result<(), ConfigError> {
        let mut next = self.clone();
        match next.network_interfaces.iter_mut().find(|n| n.iface_id == iface.iface_id) {
            Some(n) => *n = iface,
            None => next.network_interfaces.push(iface),
        }
        next.validate_devices()?;
        *self = next;
        Ok(())
    }

    /// The command line the kernel gets, before the words Bulkhead adds for the host and the
    /// devices: the boot arguments and, for a root drive, `root=` and `ro`/`rw` unless the
    /// arguments already say `root=`.
    pub fn kernel_cmdline(&self) -> String {
        let args = self.boot_source.as_ref().map_or(DEFAULT_BOOT_ARGS, BootSource::boot_args);
        let mut out = args.to_string();
        let has_root = args.split_whitespace().any(|w| w.starts_with("root="));
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device).filter(|_| !has_root) {
            let dev = match &root.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            };
            out.push(' ');
            out.push_str(&dev);
            out.push_str(if root.read_only() { " ro" } else { " rw" });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> VmConfig {
        VmConfig {
            boot_source: Some(BootSource {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: Some("console=ttyS0".into()),
            }),
            ..VmConfig::default()
        }
    }

    fn drive(id: &str, root: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: Some(format!("/img/{id}").into()),
            is_root_device: root,
            is_read_only: None,
            partuuid: None,
            cache_type: CacheType::Unsafe,
            rate_limiter: None,
            io_engine: None,
            socket: None,
            werror: ErrorPolicy::Report,
            rerror: ErrorPolicy::Report,
        }
    }

    fn iface(id: &str, tap: &str) -> NetworkInterface {
        NetworkInterface {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    #[test]
    fn firecracker_config_file_parses() {
        let text = r#"{
          "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1"},
          "drives": [{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true,
                      "is_read_only": false, "cache_type": "Unsafe", "io_engine": "Sync",
                      "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}}}],
          "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false,
                             "huge_pages": "None"},
          "network-interfaces": [{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0",
                                  "rx_rate_limiter": {"ops": {"size": 100, "refill_time": 100, "one_time_burst": 50}}}],
          "logger": {"log_path": "/tmp/log", "level": "Info"},
          "metrics": {"metrics_path": "/tmp/metrics"},
          "vsock": null, "balloon": null, "entropy": null, "mmds-config": null, "cpu-config": null
        }"#;
        let cfg = VmConfig::from_json(text).expect("parse");
        cfg.validate().expect("valid");
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.drives[0].rate_limiter.expect("limiter").to_rate_limit().expect("ok").bytes_per_sec, 1 << 20);
        let rx = cfg.network_interfaces[0].rx_rate_limiter.expect("rx").to_rate_limit().expect("ok");
        assert_eq!((rx.ops_per_sec, rx.ops_burst, rx.ops_one_time), (1000, 100, 50));
        assert_eq!(cfg.network_interfaces[0].guest_mac, Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])));
        assert_eq!(cfg.kernel_cmdline(), "console=ttyS0 reboot=k panic=1 root=/dev/vda rw");
        // What GET /vm/config answers reads back as the same VM.
        assert_eq!(VmConfig::from_json(&cfg.to_json()).expect("round trip"), cfg);
    }

    #[test]
    fn unknown_and_unsupported_fields_are_refused_clearly() {
        let e = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k", "foo": 1}}"#).expect_err("unknown");
        assert!(e.to_string().contains("unknown field `foo`"), "{e}");
        let e = VmConfig::from_json(r#"{"bogus": {}}"#).expect_err("unknown section");
        assert!(e.to_string().contains("bogus"), "{e}");
        let mut cfg = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 3}}"#)
            .expect("parses");
        assert_eq!(cfg.validate(), Err(ConfigError::Unsupported("vsock".into())));
        cfg.vsock = None;
        cfg.validate().expect("valid without vsock");
        let e = VmConfig::from_json(r#"{"machine-config": {"vcpu_count": 1}}"#).expect_err("mem missing");
        assert!(e.to_string().contains("mem_size_mib"), "{e}");
    }

    #[test]
    fn validation_catches_each_mistake() {
        assert_eq!(VmConfig::default().validate(), Err(ConfigError::NoBootSource));
        let mut c = minimal();
        c.machine_config.vcpu_count = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(0)));
        c.machine_config.vcpu_count = 3;
        c.machine_config.smt = true;
        assert_eq!(c.validate(), Err(ConfigError::SmtOddVcpus(3)));
        let mut c = minimal();
        c.machine_config.mem_size_mib = MAX_MEM_MIB + 1;
        assert!(matches!(c.validate(), Err(ConfigError::MemSize(_))));
        let mut c = minimal();
        c.drives = vec![drive("a", true), drive("a", false)];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateId { .. })));
        c.drives = vec![drive("a", true), drive("b", true)];
        assert_eq!(c.validate(), Err(ConfigError::SecondRoot("a".into())));
        c.drives = vec![drive("a-b", false)];
        assert!(matches!(c.validate(), Err(ConfigError::BadId { .. })));
        let mut d = drive("a", false);
        d.path_on_host = None;
        c.drives = vec![d];
        assert_eq!(c.validate(), Err(ConfigError::NoDrivePath("a".into())));
        let mut c = minimal();
        c.network_interfaces = vec![iface("e0", "tap0"), iface("e1", "tap0")];
        assert_eq!(c.validate(), Err(ConfigError::DuplicateTap("tap0".into())));
        c.network_interfaces = vec![iface("e0", "a/b")];
        assert!(matches!(c.validate(), Err(ConfigError::BadTapName(_))));
        let mut c = minimal();
        c.bulkhead.faults = vec![FaultSchedule::parse("block:kill").expect("parse")];
        assert!(matches!(c.validate(), Err(ConfigError::UnknownDevice { .. })));
        c.drives = vec![drive("root", true)];
        c.validate().expect("the fault now has a device");
        let mut c = minimal();
        c.bulkhead.console.input = "tty".into();
        assert!(c.validate().is_err());
        let mut c = minimal();
        c.boot_source.as_mut().expect("boot").boot_args = Some("x".repeat(MAX_CMDLINE + 1));
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong(_))));
    }

    #[test]
    fn put_drive_keeps_the_root_first_and_refusals_change_nothing() {
        let mut c = minimal();
        c.put_drive(drive("data", false)).expect("data");
        c.put_drive(drive("root", true)).expect("root");
        assert_eq!(c.drives.iter().map(|d| d.drive_id.as_str()).collect::<Vec<_>>(), ["root", "data"]);
        let before = c.clone();
        assert!(c.put_drive(drive("other", true)).is_err());
        assert!(c.put_drive(drive("bad-id", false)).is_err());
        assert_eq!(c, before, "a refused PUT changes nothing");
        let mut ro = drive("root", true);
        ro.is_read_only = Some(true);
        c.put_drive(ro).expect("replace");
        assert_eq!(c.drives.len(), 2);
        assert!(c.kernel_cmdline().ends_with("root=/dev/vda ro"));
        let mut c2 = minimal();
        c2.boot_source.as_mut().expect("boot").boot_args = Some("root=/dev/vdb".into());
        c2.put_drive(drive("root", true)).expect("root");
        assert_eq!(c2.kernel_cmdline(), "root=/dev/vdb", "the user's root= wins");
        let before = c.clone();
        let mut n = iface("eth0", "tap0");
        n.guest_mac = Some("02:00:00:00:00:01".parse().expect("mac"));
        c.put_network_interface(n.clone()).expect("nic");
        let mut n2 = iface("eth1", "tap1");
        n2.guest_mac = n.guest_mac;
        assert!(matches!(c.put_network_interface(n2), Err(ConfigError::DuplicateMac(_))));
        assert_ne!(c, before);
        assert_eq!(c.network_interfaces.len(), 1);
    }

    #[test]
    fn device_plan_numbers_and_resolves() {
        let mut c = minimal();
        c.drives = vec![drive("root", true), drive("data", false)];
        c.network_interfaces = vec![iface("eth0", "tap0")];
        let plan = c.plan();
        assert_eq!(plan.devices().len(), 4);
        assert_eq!(plan.resolve("console"), Some(DeviceId(0)));
        assert_eq!(plan.resolve("block"), Some(DeviceId(1)));
        assert_eq!(plan.resolve("disk1"), Some(DeviceId(2)));
        assert_eq!(plan.resolve("block1"), Some(DeviceId(2)));
        assert_eq!(plan.resolve("data"), Some(DeviceId(2)));
        assert_eq!(plan.resolve("block-data"), Some(DeviceId(2)));
        assert_eq!(plan.resolve("net"), Some(DeviceId(3)));
        assert_eq!(plan.resolve("net0"), Some(DeviceId(3)));
        assert_eq!(plan.resolve("eth0"), Some(DeviceId(3)));
        assert_eq!(plan.resolve("net-eth0"), Some(DeviceId(3)));
        for bad in ["block2", "net1", "netx", "gpu", "", "block-"] {
            assert_eq!(plan.resolve(bad), None, "{bad}");
        }
        assert_eq!(plan.get(DeviceId(2)).map(|d| d.kind), Some(DeviceKind::Block));
        // An id that looks like a kind and index means the device with that id.
        c.drives = vec![drive("disk0", false), drive("block0", false)];
        assert_eq!(c.plan().resolve("block0"), Some(DeviceId(2)));
    }

    #[test]
    fn token_buckets_map_both_ways() {
        let b = TokenBucketConfig::from_rate(4 << 20, 0).expect("limited");
        assert_eq!((b.size, b.refill_time), (41_943, 10));
        assert!(b.rate().expect("rate").abs_diff(4 << 20) < 100);
        assert_eq!(TokenBucketConfig::from_rate(0, 5), None);
        let exact = TokenBucketConfig { size: 1000, one_time_burst: None, refill_time: 1000 };
        assert_eq!(exact.rate(), Ok(1000));
        assert_eq!(TokenBucketConfig { size: 0, one_time_burst: None, refill_time: 0 }.rate(), Ok(0));
        assert!(TokenBucketConfig { size: 5, one_time_burst: None, refill_time: 0 }.rate().is_err());
        assert!(TokenBucketConfig { size: RATE_MAX + 1, one_time_burst: None, refill_time: 1 }.rate().is_err());
        let cli = RateLimit { bytes_per_sec: 1 << 20, bytes_burst: 65536, ops_per_sec: 500, ..RateLimit::default() };
        let cfg = RateLimiterConfig::from_rate_limit(&cli).expect("limited");
        let back = cfg.to_rate_limit().expect("valid");
        assert_eq!(back.bytes_burst, 65536);
        // The refill time is whole milliseconds (62.5 ms here becomes 63): within 1 %.
        assert!(back.bytes_per_sec.abs_diff(1 << 20) <= (1 << 20) / 100, "{}", back.bytes_per_sec);
        assert_eq!(back.ops_per_sec, 500);
        assert_eq!(RateLimiterConfig::from_rate_limit(&RateLimit::default()), None);
    }

    #[test]
    fn strings_round_trip() {
        let i = InjectSpec::parse("block1:write-outside-root@250").expect("parse");
        assert_eq!(InjectSpec::parse(&i.to_string()), Ok(i));
        for bad in ["console:execve", "console@3", "console:fork@1", "console:execve@-1", "a b:execve@1"] {
            assert!(InjectSpec::parse(bad).is_err(), "{bad}");
        }
        let r = RestartCap::parse("5/2").expect("parse");
        assert_eq!(r.to_string(), "5/2");
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(serde_json::from_str::<RestartCap>(&json).expect("back"), r);
        let mac: MacAddr = "02:AB:00:00:00:01".parse().expect("mac");
        assert_eq!(mac.to_string(), "02:ab:00:00:00:01");
        assert!("01:00:00:00:00:00".parse::<MacAddr>().is_err(), "multicast");
        assert!("00:00:00:00:00:00".parse::<MacAddr>().is_err(), "zero");
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err(), "short");
        let mut c = minimal();
        c.bulkhead.faults = vec![FaultSchedule::parse("console:kill,every=1s,count=3").expect("parse")];
        c.bulkhead.inject_forbidden = vec![InjectSpec::parse("console:execve@5").expect("parse")];
        assert_eq!(VmConfig::from_json(&c.to_json()).expect("round trip"), c);
    }
}
