//! The control channel: set-up messages and fds over a Unix `SOCK_SEQPACKET` socket.
//!
//! Messages are a serde enum encoded with bincode 1.3 (fixed-width integers, a size limit on
//! decode, trailing bytes rejected). Fds travel as `SCM_RIGHTS` and arrive `O_CLOEXEC`. This channel
//! is for set-up and management only, never for the exit path.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use bincode::Options;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use crate::wait;

/// Largest encoded message accepted or sent.
pub const MAX_MSG_SIZE: usize = 64 * 1024;
/// Most fds accepted with one message.
pub const MAX_FDS: usize = 16;
/// Kernel limit on fds in one `SCM_RIGHTS` message; the receive buffer holds that many so extra
/// fds are received (and closed) instead of leaking on truncation.
const SCM_MAX_FD: usize = 253;

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating the socket pair failed.
    #[error("socketpair failed")]
    Socket(#[source] nix::Error),
    /// Encoding failed (or the message exceeds [`MAX_MSG_SIZE`]).
    #[error("encode control message")]
    Encode(#[source] bincode::Error),
    /// The received bytes are not a valid message.
    #[error("decode control message")]
    Decode(#[source] bincode::Error),
    /// The message is larger than [`MAX_MSG_SIZE`].
    #[error("control message too large")]
    TooLarge,
    /// More than [`MAX_FDS`] fds attached (they were closed).
    #[error("too many fds ({0}) with a control message")]
    TooManyFds(usize),
    /// `sendmsg` failed.
    #[error("sendmsg failed")]
    Send(#[source] nix::Error),
    /// The peer's receive queue is full (it reads nothing): a non-blocking send gave up.
    #[error("peer's control queue is full")]
    Full,
    /// `recvmsg` or `poll` failed.
    #[error("recvmsg failed")]
    Recv(#[source] nix::Error),
    /// Nothing arrived before the deadline.
    #[error("no control message before the deadline")]
    Timeout,
    /// The peer closed its end.
    #[error("control channel closed by peer")]
    Closed,
    /// A message arrived that the protocol does not allow here.
    #[error("unexpected control message: {0}")]
    Unexpected(String),
}

/// Role of an fd passed with [`ControlMsg::Setup`]; `ServiceSetup::fds[i]` names the i-th fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FdRole {
    /// The memfd of the exit ring.
    Ring,
    /// Doorbell the core rings after submitting.
    SubmitBell,
    /// Doorbell the service rings after completing.
    CompleteBell,
    /// Where the device writes its output (console).
    Output,
    /// Where the device reads its input (console).
    Input,
    /// EventFd registered as an irqfd: writing it raises the device's interrupt.
    Irq,
    /// The memfd backing guest RAM (mapped per [`BlockConfig::memory`]).
    GuestMemory,
    /// The disk image the core opened (read-write, or read-only for a read-only disk).
    Disk,
    /// A second open file description of a writable disk image that is synced only to learn
    /// whether a writeback error happened since it was last synced: Linux reports such an error
    /// once per description, so an instance that died inside a flush may have taken it from
    /// [`Disk`](Self::Disk) with it; this one still has it (see `device-services`' block docs).
    DiskWitness,
    /// EventFd registered as an ioeventfd on the virtio-mmio QueueNotify register with
    /// datamatch = this queue index: readable when the guest kicks that queue.
    QueueNotify(u16),
    /// The device's state region (`crate::state::StateRegion`, [`crate::state::STATE_REGION_LEN`]
    /// bytes, created and kept by the core): the device's state survives the service in it.
    StateRegion,
    /// The TAP device the core opened for a net service (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
    /// vnet header size 12, non-blocking).
    Tap,
}

/// Geometry of the exit ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSetup {
    /// Entries per direction (power of two).
    pub capacity: u32,
    /// Size of the region in bytes.
    pub region_len: u64,
}

/// Device-specific configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceConfig {
    /// A 16550 UART at port `base` spanning `len` ports.
    Console {
        /// First port (absolute).
        base: u16,
        /// Number of ports (8 for a 16550).
        len: u16,
    },
    /// A virtio-blk device behind a virtio-mmio window.
    Block(BlockConfig),
    /// A virtio-net device behind a virtio-mmio window.
    Net(NetConfig),
}

/// One range of guest RAM inside the guest-memory memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical address of the range.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the range in the memfd.
    pub file_offset: u64,
}

/// A token-bucket limit on a device's traffic: the service spends one token per byte from the
/// byte bucket and one per operation (a block request, a network frame) from the ops bucket, and
/// holds work back while either bucket is empty. A rate of 0 means unlimited. A bucket holds at
/// most its burst (0 = the default of [`RateLimit::DEFAULT_BURST_MS`] worth of its rate) and starts
/// full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Bytes per second (0 = unlimited).
    pub bytes_per_sec: u64,
    /// Size of the byte bucket (0 = the default burst).
    pub bytes_burst: u64,
    /// Operations per second: requests for block, frames for net (0 = unlimited).
    pub ops_per_sec: u64,
    /// Size of the ops bucket (0 = the default burst).
    pub ops_burst: u64,
    /// Bytes available once on top of the byte bucket (Firecracker's `one_time_burst`).
    pub bytes_one_time: u64,
    /// Operations available once on top of the ops bucket.
    pub ops_one_time: u64,
}

impl RateLimit {
    /// The burst a bucket gets when none is given, in milliseconds of its rate.
    pub const DEFAULT_BURST_MS: u64 = 10;

    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec == 0 && self.ops_per_sec == 0
    }
}

/// Configuration of a virtio-blk service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Guest physical address of the device's virtio-mmio window (absolute).
    pub mmio_base: u64,
    /// Length of the window in bytes (0x200 at least; normally 0x1000).
    pub mmio_len: u64,
    /// GSI the irqfd is registered on (for logs; the service only writes the irqfd).
    pub gsi: u32,
    /// Guest RAM: the ranges of the [`FdRole::GuestMemory`] memfd to map.
    pub memory: Vec<MemoryRegion>,
    /// Size of the disk image in bytes, as the core saw it.
    pub disk_size: u64,
    /// Whether the disk is read-only (writes fail with IOERR; `VIRTIO_BLK_F_RO` offered).
    pub read_only: bool,
    /// Serial returned by `GET_ID` (at most 20 bytes are used).
    pub id: String,
    /// Number of virtqueues (one [`FdRole::QueueNotify`] fd each).
    pub num_queues: u16,
    /// Largest size of each queue (power of two, at most 32768).
    pub queue_size: u16,
    /// Limit on the disk's bytes and requests per second.
    pub rate_limit: RateLimit,
    /// What a host error on a write, flush or discard does.
    pub write_errors: ErrorPolicy,
    /// What a host error on a read does.
    pub read_errors: ErrorPolicy,
}

/// What a disk does when the host fails a guest's request (an I/O error, a full disk), as
/// QEMU's `werror`/`rerror`. A request the guest got wrong (out of range, a bad buffer) is
/// answered IOERR whatever the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// The guest gets IOERR (the default).
    #[default]
    Report,
    /// The request is kept, the service asks the core to pause the VM
    /// ([`ControlMsg::IoStopped`]) and retries it when the VM is resumed: the operator frees
    /// space or fixes the storage, resumes, and nothing is lost.
    Stop,
    /// [`Stop`](Self::Stop) when the disk is full (ENOSPC, EDQUOT), [`Report`](Self::Report)
    /// otherwise.
    Enospc,
}

impl ErrorPolicy {
    /// Parses `report`, `stop` or `enospc`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "report" => Ok(Self::Report),
            "stop" => Ok(Self::Stop),
            "enospc" => Ok(Self::Enospc),
            other => Err(format!("error policy `{other}`: expected report, stop or enospc")),
        }
    }

    /// The policy's name, as [`parse`](Self::parse) takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Report => "report",
            Self::Stop => "stop",
            Self::Enospc => "enospc",
        }
    }

    /// Whether a host error `errno` stops the VM under this policy.
    pub fn stops_on(self, errno: i32) -> bool {
        match self {
            Self::Report => false,
            Self::Stop => true,
            Self::Enospc => errno == libc::ENOSPC || errno == libc::EDQUOT,
        }
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`, for logs.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Configuration of a virtio-net service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Guest physical address of the device's virtio-mmio window (absolute).
    pub mmio_base: u64,
    /// Length of the window in bytes (0x200 at least; normally 0x1000).
    pub mmio_len: u64,
    /// GSI the irqfd is registered on (for logs; the service only writes the irqfd).
    pub gsi: u32,
    /// Guest RAM: the ranges of the [`FdRole::GuestMemory`] memfd to map.
    pub memory: Vec<MemoryRegion>,
    /// The MAC address the device reports in its config space.
    pub mac: [u8; 6],
    /// Largest size of the RX and TX queues (power of two, at most 32768).
    pub queue_size: u16,
    /// Name of the TAP interface (for logs; the service uses only the [`FdRole::Tap`] fd).
    pub tap_name: String,
    /// Limit on the bytes and frames per second the guest receives.
    pub rx_rate_limit: RateLimit,
    /// Limit on the bytes and frames per second the guest sends.
    pub tx_rate_limit: RateLimit,
}

/// A set of Linux namespaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSet {
    /// User namespace.
    pub user: bool,
    /// Mount namespace.
    pub mnt: bool,
    /// PID namespace.
    pub pid: bool,
    /// IPC namespace.
    pub ipc: bool,
    /// UTS namespace.
    pub uts: bool,
    /// Network namespace.
    pub net: bool,
}

impl NamespaceSet {
    /// All six.
    pub const ALL: Self = Self { user: true, mnt: true, pid: true, ipc: true, uts: true, net: true };
}

/// The jail plan: what the core set up around a service it created, which the service's jail
/// checks and completes (see `device_services::jail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JailPlan {
    /// The core created the service (`clone3`) in `namespaces`, and mapped `switch_to`
    /// `(uid, gid)` in its user namespace when it could.
    Created {
        /// The namespaces the service is in.
        namespaces: NamespaceSet,
        /// Unprivileged ids to switch to after `pivot_root`.
        switch_to: Option<(u32, u32)>,
    },
    /// Started by something other than the core (a test harness): the jail unshares user, mount,
    /// IPC, UTS and network namespaces itself (a PID namespace cannot be entered by the caller).
    Standalone,
}

/// Everything a service needs to start; sent once by the core with the fds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSetup {
    /// Name of the service instance, for logs.
    pub name: String,
    /// What the core created the service in, and what its jail switches to.
    pub jail: JailPlan,
    /// Ring geometry.
    pub ring: RingSetup,
    /// Role of each fd attached to the message, in order.
    pub fds: Vec<FdRole>,
    /// The device's configuration.
    pub device: DeviceConfig,
    /// How long the service keeps spinning after its last request before sleeping, in µs.
    pub idle_spin_us: u32,
}

/// Counters a service reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStats {
    /// Exit records handled.
    pub requests: u64,
    /// Exit records rejected (malformed or out of range).
    pub rejected: u64,
    /// Times the service went to sleep on its doorbell.
    pub sleeps: u64,
    /// Requests found in flight in the state region at start and redone by this instance.
    pub redone: u64,
    /// Wall time (ns) spent spinning idle for the next request before sleeping: the price of a
    /// fast round trip, apart from request work. It is CPU time unless the service was preempted
    /// while it spun.
    pub idle_spin_ns: u64,
    /// The device's own counters (this instance's).
    pub io: IoCounters,
}

/// What a device moved, as its service counts it (per instance).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    /// Requests (block) or frames (net) completed.
    pub requests: u64,
    /// Bytes towards the guest (disk reads, frames received).
    pub bytes_to_guest: u64,
    /// Bytes from the guest (disk writes, frames sent).
    pub bytes_from_guest: u64,
    /// Times work waited for rate-limit tokens.
    pub throttled: u64,
    /// Requests answered with an error or frames dropped.
    pub errors: u64,
    /// Host I/O errors the device met (EIO, ENOSPC, ...), whatever the guest was told.
    pub host_errors: u64,
}

impl IoCounters {
    /// Adds `other` field by field, saturating: the counts come from a service and may be
    /// anything.
    pub fn accumulate(&mut self, other: &IoCounters) {
        self.requests = self.requests.saturating_add(other.requests);
        self.bytes_to_guest = self.bytes_to_guest.saturating_add(other.bytes_to_guest);
        self.bytes_from_guest = self.bytes_from_guest.saturating_add(other.bytes_from_guest);
        self.throttled = self.throttled.saturating_add(other.throttled);
        self.errors = self.errors.saturating_add(other.errors);
        self.host_errors = self.host_errors.saturating_add(other.host_errors);
    }
}

/// A service's live state ([`ControlMsg::Inspect`]), for an operator or a test looking at a device
/// that seems stuck: what the ring, the device's registers and (virtio) the guest's rings hold
/// at the moment of the request. Read-only: taking it changes nothing. Values from guest memory
/// are `None` where the guest's rings could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceReport {
    /// The exit ring, as this instance sees it.
    pub ring: RingReport,
    /// The device.
    pub device: DeviceReport,
}

/// The exit ring of a [`ServiceReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingReport {
    /// Requests the core has submitted (its producer index).
    pub submitted: u64,
    /// Requests this instance has taken (its consumer index).
    pub taken: u64,
    /// Whether the read mirror is valid (the core answers mirrored reads from it).
    pub mirror_valid: bool,
    /// Times this instance went to sleep on its doorbell.
    pub sleeps: u64,
}

/// The device part of a [`ServiceReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceReport {
    /// A device with nothing more to report.
    Opaque,
    /// A 16550 UART.
    Uart(UartReport),
    /// A virtio-mmio device.
    Virtio(VirtioReport),
}

/// A UART's registers and buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartReport {
    /// Interrupt enable.
    pub ier: u8,
    /// Interrupt identification.
    pub iir: u8,
    /// Line control.
    pub lcr: u8,
    /// Line status.
    pub lsr: u8,
    /// Modem control (OUT2 gates the interrupt on a PC).
    pub mcr: u8,
    /// Bytes in the receive FIFO.
    pub fifo: u32,
    /// Input bytes waiting for room in the FIFO.
    pub pending_input: u32,
}

/// A virtio-mmio transport and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioReport {
    /// Device status register.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Interrupts raised by this instance.
    pub interrupts: u64,
    /// Interrupt bits held back until the first poll after a restore.
    pub held_interrupts: Option<u32>,
    /// Interrupt records kept against posted acknowledgements.
    pub raise_records: u32,
    /// The driver's negotiated features.
    pub driver_features: u64,
    /// Each queue.
    pub queues: Vec<QueueReport>,
    /// Device-specific counts (`rx_held`, `requests_in_flight`, ...).
    pub device: std::collections::BTreeMap<String, u64>,
}

/// One virtqueue: the device's positions beside the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReport {
    /// QueueReady.
    pub ready: bool,
    /// Queue size.
    pub size: u16,
    /// The next available-ring entry the device takes.
    pub next_avail: u16,
    /// The next used-ring entry the device fills.
    pub next_used: u16,
    /// The driver's available index.
    pub avail_idx: Option<u16>,
    /// The driver's available-ring flags (bit 0: no interrupts wanted).
    pub avail_flags: Option<u16>,
    /// EVENT_IDX: the used index the driver wants an interrupt after.
    pub used_event: Option<u16>,
    /// The used index in guest memory.
    pub used_idx: Option<u16>,
    /// EVENT_IDX: the available index the device wants a kick after.
    pub avail_event: Option<u16>,
    /// Whether the device has notifications from the driver enabled (it is not polling).
    pub kicks_armed: bool,
    /// The used index when this service instance last interrupted for this queue (`None`:
    /// not yet).
    pub notified_used: Option<u16>,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// Core → service: configuration, with the fds named in `fds`.
    Setup(Box<ServiceSetup>),
    /// Service → core: set-up done, serving the ring.
    Ready {
        /// The service's pid as it sees it.
        pid: u32,
    },
    /// Core → service: exit cleanly.
    Shutdown,
    /// Core → service: ask for counters.
    Ping {
        /// Echoed in the pong.
        token: u64,
    },
    /// Service → core: answer to a ping.
    Pong {
        /// The ping's token.
        token: u64,
        /// Current counters.
        stats: ServiceStats,
    },
    /// Service → core: set-up failed, the service is about to exit.
    Failed {
        /// Why.
        reason: String,
    },
    /// Core → service (fault injection, tests only): attempt a forbidden action. Under its
    /// seccomp filter the service dies by SIGSYS instead.
    AttemptForbidden(ForbiddenAction),
    /// Service → core: written by the service's SIGSYS handler (see [`seccomp_report`]) just
    /// before it dies: its filter trapped syscall `syscall` of calling convention `arch`.
    SeccompViolation {
        /// Syscall number (`siginfo.si_syscall`).
        syscall: u32,
        /// `AUDIT_ARCH_*` value (`siginfo.si_arch`).
        arch: u32,
    },
    /// Core → service (fault injection, a user-facing feature): misbehave as told. The
    /// supervisor in the core then detects the death, missed deadline or protocol violation and
    /// starts a fresh instance.
    InjectFault(ServiceFault),
    /// Core → service (a virtio service, once its restart cap is reached): go to a permanent
    /// failed state. The transport sets DEVICE_NEEDS_RESET, raises a configuration-change
    /// interrupt, stops using its queues and never touches guest memory again; a reset is
    /// accepted but FEATURES_OK is refused from then on. `reason` (at most
    /// [`MAX_FAILED_REASON`] bytes are used) is for the service's log.
    EnterFailed {
        /// Why the device failed.
        reason: String,
    },
    /// Core → service (the VM is pausing): finish the work in hand, then take no chain, write
    /// no guest memory, raise no interrupt and read no back end (TAP) until `Resume`. Control
    /// messages are still answered. Acknowledged with `Paused`.
    Pause {
        /// Echoed in the acknowledgement.
        token: u64,
    },
    /// Service → core: paused; the state region is current.
    Paused {
        /// The `Pause`'s token.
        token: u64,
    },
    /// Core → service: serve again. Acknowledged with `Resumed`.
    Resume {
        /// Echoed in the acknowledgement.
        token: u64,
    },
    /// Service → core: serving again.
    Resumed {
        /// The `Resume`'s token.
        token: u64,
    },
    /// Core → service: replace the rate limits (buckets start full). Acknowledged with
    /// `RateLimitSet`.
    SetRateLimit {
        /// Echoed in the acknowledgement.
        token: u64,
        /// The new limits.
        limits: RateLimitUpdate,
    },
    /// Service → core: the limits of `SetRateLimit` `token` apply now (`applied`), or this
    /// device has none of that kind.
    RateLimitSet {
        /// The request's token.
        token: u64,
        /// Whether they were applied.
        applied: bool,
    },
    // New variants go last: the SIGSYS report is pre-encoded with its variant index.
    /// Service → core, unasked: the host failed a request of a disk whose error policy is to
    /// stop; the request is kept and retried on resume. The core pauses the VM and shows
    /// `reason`.
    IoStopped {
        /// What failed, for the operator (`write at sector 123: No space left on device`).
        reason: String,
    },
    /// Core → service: report the live state. Answered with `Inspected`.
    Inspect {
        /// Echoed in the answer.
        token: u64,
    },
    /// Service → core: the state asked for by `Inspect` `token`.
    Inspected {
        /// The request's token.
        token: u64,
        /// The state.
        report: Box<ServiceReport>,
    },
}

/// New rate limits for a running service ([`ControlMsg::SetRateLimit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RateLimitUpdate {
    /// A disk's bytes and requests.
    Block(RateLimit),
    /// A NIC's two directions.
    Net {
        /// What the guest receives.
        rx: RateLimit,
        /// What the guest sends.
        tx: RateLimit,
    },
}

/// Longest [`ControlMsg::EnterFailed`] reason a service uses (longer ones are cut).
pub const MAX_FAILED_REASON: usize = 512;

/// `reason` cut to at most [`MAX_FAILED_REASON`] bytes, at a character boundary.
pub fn bounded_reason(reason: &str) -> &str {
    if reason.len() <= MAX_FAILED_REASON {
        return reason;
    }
    let mut end = MAX_FAILED_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A fault a service injects into itself when told to ([`ControlMsg::InjectFault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceFault {
    /// Exit at once with `_exit(FAULT_CRASH_STATUS)`.
    Crash,
    /// `abort()`. (As pid 1 of its PID namespace the service ignores SIGABRT's default action,
    /// so glibc's fallback ends it with SIGSEGV there; outside a PID namespace it dies by SIGABRT.)
    Abort,
    /// A store through a null pointer: dies by SIGSEGV.
    Segv,
    /// Stop answering the ring and the control socket forever (blocks in `poll` with no fds).
    Hang,
    /// Delay every later answer on the ring by this many milliseconds (0 turns it off).
    Slow {
        /// Delay per answer, in ms.
        ms: u32,
    },
    /// Answer the next request with a wrong sequence number (a protocol violation).
    CorruptReply,
    /// Make the device's next back-end I/O call (a disk read, write or flush) take this many
    /// milliseconds longer, as slow storage would (marked in the ring as I/O like the call).
    SlowIo {
        /// Extra time, in ms.
        ms: u32,
    },
    /// Allocate and touch heap memory, 1 MiB at a time, until the data bound (`RLIMIT_DATA`)
    /// refuses more; keep it and serve on (a leak: the memory is charged to the VM's cgroup).
    Leak,
}

/// Exit status of a service told to [`ServiceFault::Crash`].
pub const FAULT_CRASH_STATUS: i32 = 86;
/// Longest delay [`ServiceFault::Slow`] accepts, in ms (longer requests are clamped).
pub const FAULT_SLOW_MAX_MS: u32 = 60_000;

/// A fault the user injects into a running VM's device (`bulkhead fault`, `--fault`): either
/// done by the core (`kill`, `corrupt-state`), or sent to the service ([`ServiceFault`], or an
/// [`ForbiddenAction`] for `seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultAction {
    /// The core sends SIGKILL through the pidfd.
    Kill,
    /// The service `_exit`s.
    Crash,
    /// The service calls `abort()`.
    Abort,
    /// The service stores through a null pointer.
    Segv,
    /// The service stops answering forever.
    Hang,
    /// The service delays every answer by this many ms.
    Slow {
        /// Delay per answer, in ms.
        ms: u32,
    },
    /// The service answers the next request with a wrong sequence number.
    CorruptReply,
    /// The service's next back-end I/O call takes this many ms longer (slow storage).
    SlowIo {
        /// Extra time, in ms.
        ms: u32,
    },
    /// The core flips bytes in the device's state region, then kills the service: the next
    /// instance must refuse the state and signal DEVICE_NEEDS_RESET.
    CorruptState,
    /// The service attempts a forbidden system call (`execve`); its filter kills it by SIGSYS.
    Seccomp,
    /// The service allocates and keeps heap memory up to its data bound, serving on (a leak).
    Leak,
}

impl FaultAction {
    /// Whether the action ends the instance by itself (at once, or for `hang` when the core's
    /// liveness check notices). `slow` does not; `corrupt-reply` does only once the guest
    /// accesses the device.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::Slow { .. } | Self::SlowIo { .. } | Self::CorruptReply | Self::Leak)
    }

    /// The names [`parse`](Self::parse) accepts.
    pub const NAMES: &'static str =
        "kill, crash, abort, segv, hang, slow=MS, slow-io=MS, corrupt-reply, corrupt-state, seccomp, leak";

    /// Parses `kill|crash|abort|segv|hang|slow=MS|slow-io=MS|corrupt-reply|corrupt-state|seccomp|leak`.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "kill" => Self::Kill,
            "crash" => Self::Crash,
            "abort" => Self::Abort,
            "segv" => Self::Segv,
            "hang" => Self::Hang,
            "corrupt-reply" => Self::CorruptReply,
            "corrupt-state" => Self::CorruptState,
            "seccomp" => Self::Seccomp,
            "leak" => Self::Leak,
            other => {
                let ms = |v: &str| match v.parse::<u32>() {
                    Ok(ms) if ms <= FAULT_SLOW_MAX_MS => Ok(ms),
                    _ => Err(format!("{other}: MS is 0 to {FAULT_SLOW_MAX_MS}")),
                };
                if let Some(v) = other.strip_prefix("slow=") {
                    Self::Slow { ms: ms(v)? }
                } else if let Some(v) = other.strip_prefix("slow-io=") {
                    Self::SlowIo { ms: ms(v)? }
                } else {
                    return Err(format!("unknown fault `{other}` (expected {})", Self::NAMES));
                }
            }
        })
    }
}

impl std::fmt::Display for FaultAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kill => f.write_str("kill"),
            Self::Crash => f.write_str("crash"),
            Self::Abort => f.write_str("abort"),
            Self::Segv => f.write_str("segv"),
            Self::Hang => f.write_str("hang"),
            Self::Slow { ms } => write!(f, "slow={ms}"),
            Self::SlowIo { ms } => write!(f, "slow-io={ms}"),
            Self::CorruptReply => f.write_str("corrupt-reply"),
            Self::CorruptState => f.write_str("corrupt-state"),
            Self::Seccomp => f.write_str("seccomp"),
            Self::Leak => f.write_str("leak"),
        }
    }
}

/// Supervision metrics of one service, as `bulkhead stats` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMetrics {
    /// Service name (`console`, `block-disk0`, ...).
    pub name: String,
    /// Pid of the current instance.
    pub pid: u32,
    /// Instances started after the first.
    pub restarts: u32,
    /// Death → serving again of the last restart, in µs.
    pub last_restart_us: Option<u64>,
    /// Median of the same, in µs.
    pub median_restart_us: Option<u64>,
    /// Maximum of the same, in µs.
    pub max_restart_us: Option<u64>,
    /// Exits forwarded and answered.
    pub exits_forwarded: u64,
    /// Reads answered from the service's read mirror, without a round trip.
    pub exits_mirrored: u64,
    /// Writes posted to the service without the vCPU waiting (not counted in
    /// `exits_forwarded`).
    #[serde(default)]
    pub exits_posted: u64,
    /// Exits in flight at a failure, completed against the next instance.
    pub exits_redone: u64,
    /// Device requests (block requests, net chains) an instance found in flight in the state
    /// region at its start and redid, summed over all instances.
    pub requests_redone: u64,
    /// Exits completed with the failure value (all-ones reads, dropped writes).
    pub exits_failed: u64,
    /// Why the device was marked failed, if it was.
    pub failed: Option<String>,
}

/// A sandbox escape attempt a service performs when told to ([`ControlMsg::AttemptForbidden`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForbiddenAction {
    /// `open("/etc/passwd")`.
    OpenHostFile,
    /// `execve("/bin/sh")`.
    Execve,
    /// `socket(AF_INET, SOCK_STREAM)`.
    InetSocket,
    /// `ptrace(PTRACE_ATTACH)` on pid 1.
    Ptrace,
    /// `mount` of a tmpfs.
    Mount,
    /// Create and write `/tmp/bulkhead-escape` (outside the service's root).
    WriteOutsideRoot,
    /// `kill(-1, SIGKILL)`: every process the service may signal (another VM's, its core).
    SignalAll,
}

impl ForbiddenAction {
    /// Every action.
    pub const ALL: [ForbiddenAction; 7] = [
        ForbiddenAction::OpenHostFile,
        ForbiddenAction::Execve,
        ForbiddenAction::InetSocket,
        ForbiddenAction::Ptrace,
        ForbiddenAction::Mount,
        ForbiddenAction::WriteOutsideRoot,
        ForbiddenAction::SignalAll,
    ];
}

/// Bincode tag of [`ControlMsg::SeccompViolation`] (its variant index; checked by a test).
const SECCOMP_VIOLATION_TAG: u32 = 7;
/// Length of an encoded [`ControlMsg::SeccompViolation`].
pub const SECCOMP_REPORT_LEN: usize = 12;

/// The wire encoding of `ControlMsg::SeccompViolation { syscall, arch }`, built without
/// allocating so a signal handler can write it with one `write(2)` on the control socket.
pub fn seccomp_report(syscall: u32, arch: u32) -> [u8; SECCOMP_REPORT_LEN] {
    let mut b = [0u8; SECCOMP_REPORT_LEN];
    b[0..4].copy_from_slice(&SECCOMP_VIOLATION_TAG.to_le_bytes());
    b[4..8].copy_from_slice(&syscall.to_le_bytes());
    b[8..12].copy_from_slice(&arch.to_le_bytes());
    b
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_fixint_encoding().with_limit(MAX_MSG_SIZE as u64).reject_trailing_bytes()
}

/// Encodes a message as sent on the wire.
pub fn encode(msg: &ControlMsg) -> Result<Vec<u8>, ControlError> {
    codec().serialize(msg).map_err(ControlError::Encode)
}

/// Decodes a message received from the wire (bounded, trailing bytes rejected).
pub fn decode(bytes: &[u8]) -> Result<ControlMsg, ControlError> {
    if bytes.len() > MAX_MSG_SIZE {
        return Err(ControlError::TooLarge);
    }
    codec().deserialize(bytes).map_err(ControlError::Decode)
}

/// One end of a control socket.
#[derive(Debug)]
pub struct ControlChannel {
    fd: OwnedFd,
}

impl ControlChannel {
    /// A connected pair (both ends `O_CLOEXEC`).
    pub fn pair() -> Result<(Self, Self), ControlError> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(ControlError::Socket)?;
        Ok((Self { fd: a }, Self { fd: b }))
    }

    /// Wraps an inherited socket (e.g. fd 3 in a service).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Gives up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends `msg` with `fds` attached (at most [`MAX_FDS`]), waiting while the peer's queue is
    /// full. For a service answering its (trusted) core.
    pub fn send(&self, msg: &ControlMsg, fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        self.send_with(msg, fds, MsgFlags::MSG_NOSIGNAL)
    }

    /// Sends `msg` with `fds` attached without ever waiting: a peer that reads nothing and let
    /// its queue fill gets [`ControlError::Full`]. The core sends to its services this way, as it
    /// often holds a lock other threads need while it sends.
    pub fn send_now(&self, msg: &ControlMsg, fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        self.send_with(msg, fds, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT)
    }

    fn send_with(&self, msg: &ControlMsg, fds: &[BorrowedFd<'_>], flags: MsgFlags) -> Result<(), ControlError> {
        self.send_bytes_with(&encode(msg)?, fds, flags)
    }

    /// Sends another protocol's encoded message (at most [`MAX_MSG_SIZE`] bytes) with `fds`,
    /// waiting while the peer's queue is full: the same framing as [`send`](Self::send).
    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        if bytes.len() > MAX_MSG_SIZE {
            return Err(ControlError::TooLarge);
        }
        self.send_bytes_with(bytes, fds, MsgFlags::MSG_NOSIGNAL)
    }

    /// [`send_bytes`](Self::send_bytes) without ever waiting (as [`send_now`](Self::send_now)).
    pub fn send_bytes_now(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        if bytes.len() > MAX_MSG_SIZE {
            return Err(ControlError::TooLarge);
        }
        self.send_bytes_with(bytes, fds, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT)
    }

    fn send_bytes_with(&self, bytes: &[u8], fds: &[BorrowedFd<'_>], flags: MsgFlags) -> Result<(), ControlError> {
        if fds.len() > MAX_FDS {
            return Err(ControlError::TooManyFds(fds.len()));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(bytes)];
        sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, flags, None).map_err(|e| {
            if e == nix::Error::EAGAIN {
                ControlError::Full
            } else {
                ControlError::Send(e)
            }
        })?;
        Ok(())
    }

    /// Receives one message and its fds, waiting until `deadline` at most.
    pub fn recv(&self, deadline: Instant) -> Result<(ControlMsg, Vec<OwnedFd>), ControlError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = wait::wait_readable(self.fd.as_fd(), left).map_err(|e| ControlError::Recv(io_to_nix(&e)))?;
        if !ready {
            return Err(ControlError::Timeout);
        }
        self.recv_now()
    }

    /// Receives one message that is already queued (returns [`ControlError::Timeout`] if none).
    pub fn recv_now(&self) -> Result<(ControlMsg, Vec<OwnedFd>), ControlError> {
        let (bytes, fds) = self.recv_bytes_now()?;
        Ok((decode(&bytes)?, fds))
    }

    /// [`recv`](Self::recv) for another protocol: the message's bytes (bounded by
    /// [`MAX_MSG_SIZE`], checked for truncation) and its fds, for the caller to decode.
    pub fn recv_bytes(&self, deadline: Instant) -> Result<(Vec<u8>, Vec<OwnedFd>), ControlError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = wait::wait_readable(self.fd.as_fd(), left).map_err(|e| ControlError::Recv(io_to_nix(&e)))?;
        if !ready {
            return Err(ControlError::Timeout);
        }
        self.recv_bytes_now()
    }

    fn recv_bytes_now(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), ControlError> {
        // The next message's length first (`MSG_PEEK | MSG_TRUNC` returns a datagram's full
        // length and leaves it, fds included, queued), so a buffer of its size does: most are a
        // few dozen bytes, and a zeroed 64 KiB buffer per message (a liveness ping every 250 ms)
        // cost a memset each and kept 64 KiB of every service's heap resident.
        // (`recvmsg`, as below: it is the call the services' seccomp filters allow.)
        let mut peek = [0u8; 1];
        let len = {
            let mut iov = [IoSliceMut::new(&mut peek)];
            recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                None,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(|e| if e == nix::Error::EAGAIN { ControlError::Timeout } else { ControlError::Recv(e) })?
            .bytes
        };
        // One byte more than the message, up to the cap plus one, so truncation stays detectable.
        let mut buf = vec![0u8; len.saturating_add(1).min(MAX_MSG_SIZE + 1)];
        let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let (len, flags, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(|e| {
                if e == nix::Error::EAGAIN {
                    ControlError::Timeout
                } else {
                    ControlError::Recv(e)
                }
            })?;
            let mut fds = Vec::new();
            // With a buffer sized for SCM_MAX_FD the control data is never truncated; if it is
            // anyway, nix refuses to iterate and the fds cannot be recovered.
            if let Ok(it) = msg.cmsgs() {
                for c in it {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for r in raw {
                            // SAFETY: the kernel just installed `r` in our table for us; nothing
                            // else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                        }
                    }
                }
            }
            (msg.bytes, msg.flags, fds)
        };
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(ControlError::TooManyFds(fds.len()));
        }
        if flags.contains(MsgFlags::MSG_TRUNC) || len > MAX_MSG_SIZE {
            return Err(ControlError::TooLarge);
        }
        if len == 0 {
            return Err(ControlError::Closed);
        }
        if fds.len() > MAX_FDS {
            return Err(ControlError::TooManyFds(fds.len()));
        }
        buf.truncate(len);
        Ok((buf, fds))
    }

    /// Sends raw bytes (tests of a hostile peer use this to send garbage).
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ControlError> {
        let iov = [IoSlice::new(bytes)];
        sendmsg::<()>(self.fd.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None).map_err(ControlError::Send)?;
        Ok(())
    }
}

impl AsFd for ControlChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn io_to_nix(e: &std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EventFd;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    fn setup() -> ControlMsg {
        ControlMsg::Setup(Box::new(ServiceSetup {
            name: "console".into(),
            jail: JailPlan::Created { namespaces: NamespaceSet::ALL, switch_to: Some((65534, 65534)) },
            ring: RingSetup { capacity: 16, region_len: 8192 },
            fds: vec![FdRole::Ring, FdRole::Irq],
            device: DeviceConfig::Console { base: 0x3f8, len: 8 },
            idle_spin_us: 200,
        }))
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = ControlChannel::pair().expect("pair");
        let e1 = EventFd::new(0).expect("eventfd");
        let e2 = EventFd::new(0).expect("eventfd");
        // SAFETY: the EventFds own these fds and outlive the borrows.
        let fds = unsafe { [BorrowedFd::borrow_raw(e1.as_raw_fd()), BorrowedFd::borrow_raw(e2.as_raw_fd())] };
        a.send(&setup(), &fds).expect("send");
        let (msg, got) = b.recv(soon()).expect("recv");
        assert_eq!(msg, setup());
        assert_eq!(got.len(), 2);
        for f in &got {
            let flags = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fds must be CLOEXEC");
        }
        // The received fd is the same eventfd: a write through it is seen by the original.
        // SAFETY: `got[1]` is an owned eventfd we just received; EventFd takes ownership of a dup.
        let e2b = unsafe { EventFd::from_raw_fd(got[1].try_clone().expect("dup").into_raw_fd()) };
        e2b.write(5).expect("write");
        assert_eq!(e2.read().expect("read"), 5);

        b.send(
            &ControlMsg::Pong {
                token: 7,
                stats: ServiceStats {
                    requests: 3,
                    rejected: 1,
                    sleeps: 2,
                    redone: 4,
                    idle_spin_ns: 5,
                    io: IoCounters { requests: 9, ..IoCounters::default() },
                },
            },
            &[],
        )
        .expect("send");
        let (msg, got) = a.recv(soon()).expect("recv");
        assert!(got.is_empty());
        assert_eq!(
            msg,
            ControlMsg::Pong {
                token: 7,
                stats: ServiceStats {
                    requests: 3,
                    rejected: 1,
                    sleeps: 2,
                    redone: 4,
                    idle_spin_ns: 5,
                    io: IoCounters { requests: 9, ..IoCounters::default() }
                }
            }
        );
    }

    use std::os::fd::IntoRawFd;

    #[test]
    fn block_setup_round_trips() {
        let msg = ControlMsg::Setup(Box::new(ServiceSetup {
            name: "blk0".into(),
            jail: JailPlan::Standalone,
            ring: RingSetup { capacity: 16, region_len: 8192 },
            fds: vec![FdRole::Ring, FdRole::GuestMemory, FdRole::Disk, FdRole::QueueNotify(0), FdRole::QueueNotify(1)],
            device: DeviceConfig::Block(BlockConfig {
                mmio_base: 0xd000_0000,
                mmio_len: 0x1000,
                gsi: 5,
                memory: vec![MemoryRegion { guest_addr: 0, len: 1 << 20, file_offset: 0 }],
                disk_size: 64 << 20,
                read_only: true,
                id: "disk0".into(),
                num_queues: 2,
                queue_size: 256,
                rate_limit: RateLimit {
                    bytes_per_sec: 10 << 20,
                    bytes_burst: 0,
                    ops_per_sec: 1000,
                    ops_burst: 64,
                    bytes_one_time: 1 << 20,
                    ops_one_time: 0,
                },
                write_errors: ErrorPolicy::Stop,
                read_errors: ErrorPolicy::Report,
            }),
            idle_spin_us: 200,
        }));
        let bytes = encode(&msg).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), msg);
        // Distinct queue roles are distinct keys.
        assert_ne!(FdRole::QueueNotify(0), FdRole::QueueNotify(1));
    }

    #[test]
    fn seccomp_report_is_the_wire_encoding() {
        let msg = ControlMsg::SeccompViolation { syscall: 59, arch: 0xc000_003e };
        assert_eq!(encode(&msg).expect("encode"), seccomp_report(59, 0xc000_003e).to_vec());
        assert_eq!(
            decode(&seccomp_report(257, 7)).expect("decode"),
            ControlMsg::SeccompViolation { syscall: 257, arch: 7 }
        );
        for a in ForbiddenAction::ALL {
            let m = ControlMsg::AttemptForbidden(a);
            assert_eq!(decode(&encode(&m).expect("encode")).expect("decode"), m);
        }
        for f in [
            ServiceFault::Crash,
            ServiceFault::Abort,
            ServiceFault::Segv,
            ServiceFault::Hang,
            ServiceFault::Slow { ms: 25 },
            ServiceFault::CorruptReply,
        ] {
            let m = ControlMsg::InjectFault(f);
            assert_eq!(decode(&encode(&m).expect("encode")).expect("decode"), m);
        }
        let m = ControlMsg::EnterFailed { reason: "restart cap reached".into() };
        assert_eq!(decode(&encode(&m).expect("encode")).expect("decode"), m);
    }

    #[test]
    fn failed_reasons_are_bounded_at_a_char_boundary() {
        assert_eq!(bounded_reason("short"), "short");
        let long = "é".repeat(MAX_FAILED_REASON);
        let cut = bounded_reason(&long);
        assert!(cut.len() <= MAX_FAILED_REASON && cut.len() >= MAX_FAILED_REASON - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn timeout_and_close() {
        let (a, b) = ControlChannel::pair().expect("pair");
        let t = Instant::now();
        assert!(matches!(b.recv(Instant::now() + Duration::from_millis(30)), Err(ControlError::Timeout)));
        assert!(t.elapsed() >= Duration::from_millis(25));
        drop(a);
        assert!(matches!(b.recv(soon()), Err(ControlError::Closed)));
    }

    #[test]
    fn oversize_and_garbage_rejected() {
        let (a, b) = ControlChannel::pair().expect("pair");
        a.send_raw(&vec![0u8; MAX_MSG_SIZE + 100]).expect("send big");
        assert!(matches!(b.recv(soon()), Err(ControlError::TooLarge)));
        a.send_raw(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).expect("send garbage");
        assert!(matches!(b.recv(soon()), Err(ControlError::Decode(_))));
        // A string claiming 2^60 bytes must not allocate it.
        let mut evil = vec![0u8; 4]; // variant 0 = Setup
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        a.send_raw(&evil).expect("send evil");
        assert!(matches!(b.recv(soon()), Err(ControlError::Decode(_))));
        // Trailing bytes after a valid message are rejected.
        let mut trailing = encode(&ControlMsg::Shutdown).expect("encode");
        trailing.push(0);
        a.send_raw(&trailing).expect("send");
        assert!(matches!(b.recv(soon()), Err(ControlError::Decode(_))));
        // The channel still works afterwards.
        a.send(&ControlMsg::Shutdown, &[]).expect("send");
        assert_eq!(b.recv(soon()).expect("recv").0, ControlMsg::Shutdown);
    }

    #[test]
    fn too_many_fds_rejected_and_closed() {
        let (a, b) = ControlChannel::pair().expect("pair");
        let evs: Vec<EventFd> = (0..MAX_FDS + 1).map(|_| EventFd::new(0).expect("eventfd")).collect();
        // SAFETY: the EventFds outlive the borrows.
        let fds: Vec<BorrowedFd<'_>> = evs.iter().map(|e| unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }).collect();
        assert!(matches!(a.send(&ControlMsg::Shutdown, &fds), Err(ControlError::TooManyFds(17))));
        // Bypass the sender's check with a raw sendmsg.
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let bytes = encode(&ControlMsg::Shutdown).expect("encode");
        sendmsg::<()>(
            a.as_fd().as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert!(matches!(b.recv(soon()), Err(ControlError::TooManyFds(17))));
    }

    #[test]
    fn fault_actions_parse_and_print() {
        for name in
            ["kill", "crash", "abort", "segv", "hang", "slow=250", "corrupt-reply", "corrupt-state", "seccomp", "leak"]
        {
            let a = FaultAction::parse(name).expect(name);
            assert_eq!(a.to_string(), name);
        }
        assert_eq!(FaultAction::parse("slow=7"), Ok(FaultAction::Slow { ms: 7 }));
        for bad in ["", "explode", "slow=", "slow=-1", "slow=60001"] {
            assert!(FaultAction::parse(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
