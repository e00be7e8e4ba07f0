//! The `bulkhead` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipc::control::{ErrorPolicy, FaultAction, RateLimit};

use crate::config::{
    BootSource, BulkheadConfig, ConsoleConfig, DriveConfig, InjectSpec, MacAddr, MachineConfig, NetworkInterface,
    RateLimiterConfig, RestartCap, SupervisionConfig, VmConfig,
};
use crate::faults::FaultSchedule;

/// Bulkhead: a microkernel-style VMM whose devices run as separate sandboxed processes.
///
/// With no subcommand it behaves as `firecracker` does: it serves the API on `--api-sock` and
/// boots the VM the API (or `--config-file`) describes.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", about, disable_version_flag = true, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do (none: serve the API, as `firecracker`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Firecracker-style options, when there is no subcommand.
    #[command(flatten)]
    pub vmm: VmmArgs,
}

/// `bulkhead [--api-sock PATH] [--config-file FILE] [--no-api] [--id ID]`, the way Kata and
/// firecracker-containerd start `firecracker`.
#[derive(Debug, Args, Clone)]
pub struct VmmArgs {
    /// Serve the API on this Unix socket (default: `/run/bulkhead/ID.sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Boot the VM this file describes (Firecracker's schema) at once.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// No API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// The VM's id (`GET /`, `bulkhead ls`, the default socket name).
    #[arg(long, value_name = "ID", value_parser = parse_vm_name)]
    pub id: Option<String>,
    /// Accept fault injection over the API (off by default).
    #[arg(long)]
    pub allow_faults: bool,
    /// Where the VM's cgroup goes, or none.
    #[command(flatten)]
    pub cgroup: CgroupPlacementArgs,
    /// The core's jail.
    #[command(flatten)]
    pub jail: JailArgs,
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
    /// Accepted for Firecracker compatibility and ignored: Bulkhead's filters are always on.
    #[arg(long, hide = true)]
    pub no_seccomp: bool,
    /// Accepted for Firecracker compatibility and ignored (always the strictest level).
    #[arg(long, value_name = "LEVEL", hide = true)]
    pub seccomp_level: Option<u8>,
    /// Accepted for Firecracker compatibility and ignored: Bulkhead's filters are built in.
    #[arg(long, value_name = "FILE", hide = true)]
    pub seccomp_filter: Option<PathBuf>,
    /// Added by Firecracker's jailer; accepted and ignored.
    #[arg(long, value_name = "US", hide = true)]
    pub start_time_us: Option<u64>,
    /// Added by Firecracker's jailer; accepted and ignored.
    #[arg(long, value_name = "US", hide = true)]
    pub start_time_cpu_us: Option<u64>,
    /// Added by Firecracker's jailer; accepted and ignored.
    #[arg(long, value_name = "US", hide = true)]
    pub parent_cpu_time_us: Option<u64>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest with its device services.
    Run(Box<RunArgs>),
    /// List the VMs on this host (their sockets in /run/bulkhead).
    Ls(LsArgs),
    /// Pause a running VM.
    Pause(VmRef),
    /// Resume a paused VM.
    Resume(VmRef),
    /// Ask a VM's guest to stop (Ctrl-Alt-Del), and stop the VM if it has not after a timeout.
    Stop(StopArgs),
    /// Stop a VM now.
    Kill(VmRef),
    /// Inject a fault into a device of a running VM.
    Fault(FaultArgs),
    /// Print the supervision metrics of a running VM's services.
    Stats(VmRef),
    /// Print what confines each process of a running VM, as the kernel reports it.
    Inspect(InspectArgs),
    /// Change a running VM's CPU, memory, process and I/O settings (its cgroup), live.
    Set(SetArgs),
}

/// `bulkhead set`.
#[derive(Debug, Args, Clone)]
pub struct SetArgs {
    /// The VM: its id (socket `/run/bulkhead/ID.sock`) or a socket path.
    pub vm: String,
    /// The settings to change.
    #[command(flatten)]
    pub resources: ResourceArgs,
}

/// What a VM may use, on the command line: `bulkhead run` at start, `bulkhead set` live.
#[derive(Debug, Args, Clone, Default)]
pub struct ResourceArgs {
    /// CPU weight against other VMs, 1–10000 (100 is the default share).
    #[arg(long, value_name = "N")]
    pub cpu_weight: Option<u32>,
    /// CPU limit: this many µs of CPU time per period (e.g. 50000 = half a CPU).
    #[arg(long, value_name = "US")]
    pub cpu_quota_us: Option<u64>,
    /// The period of the CPU limit, 1000–1000000 µs (default 100000).
    #[arg(long, value_name = "US")]
    pub cpu_period_us: Option<u64>,
    /// Memory limit of the whole VM, guest RAM included (bytes; K, M, G suffixes).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub memory_max: Option<u64>,
    /// Most processes and threads of the VM.
    #[arg(long, value_name = "N")]
    pub pids_max: Option<u64>,
    /// Block I/O weight, 1–10000 (where the host has the controller).
    #[arg(long, value_name = "N")]
    pub io_weight: Option<u32>,
    /// The CPUs of each vCPU thread: `CPUS[;CPUS...]`, entry i for vCPU i (cycled), each a CPU
    /// list such as `2`, `0-3` or `0,2`.
    #[arg(long, value_name = "CPUS[;CPUS...]")]
    pub vcpu_affinity: Option<String>,
}

impl ResourceArgs {
    /// The settings these arguments describe (those not given stay unset).
    pub fn to_resources(&self) -> crate::cgroup::Resources {
        crate::cgroup::Resources {
            cpu_weight: self.cpu_weight,
            cpu_quota_us: self.cpu_quota_us,
            cpu_period_us: self.cpu_period_us,
            memory_max: self.memory_max,
            pids_max: self.pids_max,
            io_weight: self.io_weight,
            vcpu_affinity: self.vcpu_affinity.as_deref().map(split_affinity),
        }
    }
}

/// `CPUS[;CPUS...]` as one CPU list per vCPU.
fn split_affinity(s: &str) -> Vec<String> {
    s.split(';').map(|l| l.trim().to_string()).collect()
}

/// `bulkhead inspect`.
#[derive(Debug, Args, Clone)]
pub struct InspectArgs {
    /// The VM: its id (socket `/run/bulkhead/ID.sock`) or a socket path.
    pub vm: String,
    /// The API's JSON (`GET /bulkhead/isolation`) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Instead, the live state of this device (its registers, exit ring and virtqueues, as
    /// `GET /bulkhead/devices/ID/state` returns it, in JSON): `console`, `block`, `net`, a
    /// device id or a service's name.
    #[arg(long, value_name = "ID", conflicts_with = "vcpus")]
    pub device: Option<String>,
    /// Instead, every vCPU's state (instruction pointer, halted or not, the local APIC's
    /// pending and in-service vectors, as `GET /bulkhead/vcpus` returns it, in JSON).
    #[arg(long)]
    pub vcpus: bool,
}

/// A VM named on the command line.
#[derive(Debug, Args, Clone)]
pub struct VmRef {
    /// The VM: its id (socket `/run/bulkhead/ID.sock`) or a socket path.
    pub vm: String,
}

/// `bulkhead ls`.
#[derive(Debug, Args, Clone)]
pub struct LsArgs {
    /// Where the sockets are.
    #[arg(long, value_name = "DIR", default_value = crate::api_client::RUNTIME_DIR)]
    pub dir: PathBuf,
    /// One JSON object per VM instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `bulkhead stop`.
#[derive(Debug, Args, Clone)]
pub struct StopArgs {
    /// The VM: its id or a socket path.
    pub vm: String,
    /// Seconds the guest gets to stop itself.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,
}

/// `bulkhead fault`.
#[derive(Debug, Args, Clone)]
pub struct FaultArgs {
    /// The VM: its id (socket `/run/bulkhead/ID.sock`) or a socket path.
    pub vm: String,
    /// The device: `console`, `block` (first disk), `blockN`, `net` (first NIC), `netN`, a
    /// device id or a service's name, or `stats` to print metrics.
    pub device: String,
    /// kill, crash, abort, segv, hang, slow=MS, slow-io=MS, corrupt-reply, corrupt-state, seccomp or leak.
    #[arg(value_parser = FaultAction::parse)]
    pub action: Option<FaultAction>,
}

/// `bulkhead run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux (booted through the 64-bit Linux boot protocol) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial RAM disk to load for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. On a PVM host the parameters a stock kernel needs there are added.
    #[arg(long, value_name = "STRING", default_value = "console=ttyS0 reboot=k panic=1")]
    pub cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub vcpus: u8,
    /// Where the guest's serial console output goes: `stdout` or a path (a FIFO, a terminal, or a
    /// file the core creates and passes to the console service). An existing non-empty file is
    /// refused unless --serial-append is given; a disk image never is written.
    #[arg(long, value_name = "stdout|PATH", default_value = "stdout")]
    pub serial_output: String,
    /// Append the console output to an existing --serial-output file.
    #[arg(long)]
    pub serial_append: bool,
    /// Where the guest's serial console input comes from: `stdin` or `none`.
    #[arg(long, value_name = "stdin|none", default_value = "stdin", value_parser = ["stdin", "none"])]
    pub serial_input: String,
    /// A virtio-blk disk served by `bulkhead-block`: `PATH[,ro][,id=NAME][,bw=RATE][,ops=N]`
    /// (`bw` in bytes/s with an optional K/M/G suffix, binary; `ops` in requests/s;
    /// `bw-burst=SIZE`, `ops-burst=N` size the buckets; `werror`/`rerror` = `report` (default),
    /// `stop` or `enospc`: what a host I/O error does, as QEMU's options of those names).
    /// Repeatable.
    #[arg(
        long = "disk",
        value_name = "PATH[,ro][,id=NAME][,bw=RATE][,ops=N][,werror=POLICY][,rerror=POLICY]",
        value_parser = DiskSpec::parse
    )]
    pub disks: Vec<DiskSpec>,
    /// A virtio-net device served by `bulkhead-net` on an existing or new TAP interface:
    /// `tap=NAME[,mac=MAC][,id=NAME][,bw=RATE][,pps=N]` (`bw` in bytes/s each way with an
    /// optional K/M/G suffix, binary; `pps` in frames/s each way; `bw-burst=SIZE`, `pps-burst=N`
    /// size the buckets). Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,id=NAME][,bw=RATE][,pps=N]", value_parser = NetSpec::parse)]
    pub nets: Vec<NetSpec>,
    /// Run the stand-alone service binaries (`bulkhead-console`, ...) from this directory. Default:
    /// `bulkhead` itself, started under each service's name (one binary: its text pages are
    /// shared by every process of every VM).
    #[arg(long, value_name = "DIR")]
    pub service_dir: Option<PathBuf>,
    /// How long the core waits for a service to answer a forwarded exit before declaring it failed.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub service_deadline_ms: u64,
    /// Liveness check: every MS milliseconds the core pings each service over its control
    /// channel; no answer within --service-deadline-ms marks it hung ("missed liveness
    /// deadline"): it is killed and restarted like a crashed one. Catches a hung service with no
    /// exit in flight (a guest driver that only polls memory). 0 disables the check.
    #[arg(long, value_name = "MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub service_liveness_ms: u64,
    /// How long one I/O call of a service (a disk write or flush on slow storage) may take
    /// before the service counts as hung. Meanwhile its forwarded exits and liveness pings wait
    /// for it instead of failing at --service-deadline-ms.
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub service_io_deadline_ms: u64,
    /// Fault injection for tests: `SERVICE:ACTION@MS` tells a service, MS milliseconds after the
    /// guest starts, to attempt a forbidden action (its seccomp filter should kill it). SERVICE is
    /// `console`, `block` (the first disk), `blockN`, `net` or `netN`; ACTION is one of `open-host-file`,
    /// `execve`, `inet-socket`, `ptrace`, `mount`, `write-outside-root`, `signal-all`. Repeatable.
    #[arg(long = "inject-forbidden", value_name = "SERVICE:ACTION@MS", value_parser = InjectSpec::parse)]
    pub inject_forbidden: Vec<InjectSpec>,
    /// Start the device services even when this host cannot create some of their namespaces
    /// (user, mount, PID, IPC, UTS, network), without those namespaces. INSECURE: without it the
    /// core refuses to start and names the namespace that failed. The rest of the jail (empty
    /// root where a mount namespace exists, no capabilities, no_new_privs, rlimits, seccomp)
    /// still applies.
    #[arg(long)]
    pub insecure_no_sandbox: bool,
    /// Accept fault injection over the API (`bulkhead fault`, `PUT /bulkhead/devices/{id}/fault`);
    /// off by default.
    #[arg(long)]
    pub allow_faults: bool,
    /// The VM's id: its API socket is `/run/bulkhead/ID.sock` (for `bulkhead ls`, `pause`,
    /// `fault`, ...). `--name` is the old spelling.
    #[arg(long, alias = "name", value_name = "ID", value_parser = parse_vm_name)]
    pub id: Option<String>,
    /// Serve the API on this socket (instead of the one `--id` implies).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Return once the VM runs, leaving it in the background (needs --id or --api-sock; the
    /// console then needs --serial-output PATH).
    #[arg(long)]
    pub detach: bool,
    /// Restart cap per service: at most N restarts per SECS seconds; one more failure marks the
    /// device failed (the VM keeps running). 0 disables restarts (fail closed).
    #[arg(long, value_name = "N/SECS", default_value = "20/10", value_parser = RestartCap::parse)]
    pub restart_max: RestartCap,
    /// Restarts tolerated per SECS seconds before the supervisor backs off (10 ms, doubling up to
    /// 1 s) between a failure and the next restart.
    #[arg(long, value_name = "N/SECS", default_value = "3/1", value_parser = RestartCap::parse)]
    pub restart_burst: RestartCap,
    /// Fault schedule: `DEVICE:ACTION[,after=DUR][,every=DUR][,count=N]`,
    /// `DEVICE:random,seed=S,every=DUR[,count=N]` (kill/crash/abort/segv/hang at seeded random
    /// times), or `DEVICE:ACTION-after=MS`. Times count from the start of the vCPUs. Repeatable.
    #[arg(long = "fault", value_name = "SPEC", value_parser = FaultSchedule::parse)]
    pub faults: Vec<FaultSchedule>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
    /// The VM's cgroup and what it may use.
    #[command(flatten)]
    pub cgroup: CgroupArgs,
    /// The core's jail.
    #[command(flatten)]
    pub jail: JailArgs,
}

/// The core's jail on the command line (`bulkhead run` and the API VMM).
#[derive(Debug, Args, Clone, Default)]
pub struct JailArgs {
    /// The core's uid once the VM is built (its services get UID+1). Default: a free pair from
    /// --id-range.
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// The core's gid (its services get GID+1; default: the uid).
    #[arg(long, value_name = "GID", requires = "uid")]
    pub gid: Option<u32>,
    /// Where VM ids are taken from, two per VM (default 1500000000-1500999999).
    #[arg(long, value_name = "FIRST-LAST", value_parser = crate::jail::IdRange::parse)]
    pub id_range: Option<crate::jail::IdRange>,
    /// INSECURE: the core keeps root and every capability for its whole life (its services are
    /// still jailed). For debugging only.
    #[arg(long)]
    pub no_jail: bool,
}

impl JailArgs {
    /// The configuration these arguments describe.
    pub fn to_config(&self) -> crate::jail::JailConfig {
        crate::jail::JailConfig { disabled: self.no_jail, uid: self.uid, gid: self.gid, id_range: self.id_range }
    }
}

/// The VM's cgroup, on the command line (`bulkhead run`; the API VMM takes the placement only,
/// and the settings in its configuration).
#[derive(Debug, Args, Clone, Default)]
pub struct CgroupArgs {
    /// What the VM may use.
    #[command(flatten)]
    pub resources: ResourceArgs,
    /// Where its cgroup goes, or none.
    #[command(flatten)]
    pub placement: CgroupPlacementArgs,
}

/// Where the VM's cgroup goes (`bulkhead run` and the API VMM).
#[derive(Debug, Args, Clone, Default)]
pub struct CgroupPlacementArgs {
    /// Create the VM's cgroup under this path of each hierarchy (default: where bulkhead runs).
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<String>,
    /// No cgroup for this VM.
    #[arg(long)]
    pub no_cgroup: bool,
}

impl CgroupArgs {
    /// The configuration these arguments describe.
    pub fn to_config(&self) -> crate::config::CgroupConfig {
        crate::config::CgroupConfig {
            disabled: self.placement.no_cgroup,
            parent: self.placement.cgroup_parent.clone(),
            resources: self.resources.to_resources(),
        }
    }
}

impl RunArgs {
    /// The VM these arguments describe. Checked by [`VmConfig::validate`] when it is built.
    pub fn to_config(&self) -> VmConfig {
        let drives = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| DriveConfig {
                drive_id: d.id.clone().unwrap_or_else(|| format!("disk{i}")),
                path_on_host: Some(d.path.clone()),
                is_root_device: false,
                is_read_only: Some(d.read_only),
                partuuid: None,
                cache_type: crate::config::CacheType::Writeback,
                rate_limiter: RateLimiterConfig::from_rate_limit(&d.rate_limit),
                io_engine: None,
                socket: None,
                werror: d.werror,
                rerror: d.rerror,
            })
            .collect();
        let network_interfaces = self
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                host_dev_name: n.tap.clone(),
                guest_mac: n.mac.map(MacAddr),
                rx_rate_limiter: RateLimiterConfig::from_rate_limit(&n.rate_limit),
                tx_rate_limiter: RateLimiterConfig::from_rate_limit(&n.rate_limit),
            })
            .collect();
        VmConfig {
            boot_source: Some(BootSource {
                kernel_image_path: self.kernel.clone(),
                initrd_path: self.initrd.clone(),
                boot_args: Some(self.cmdline.clone()),
            }),
            machine_config: MachineConfig {
                vcpu_count: self.vcpus,
                mem_size_mib: self.mem,
                ..MachineConfig::default()
            },
            drives,
            network_interfaces,
            bulkhead: BulkheadConfig {
                console: ConsoleConfig {
                    output: self.serial_output.clone(),
                    input: self.serial_input.clone(),
                    append: self.serial_append,
                },
                supervision: SupervisionConfig {
                    service_deadline_ms: self.service_deadline_ms,
                    service_liveness_ms: self.service_liveness_ms,
                    service_io_deadline_ms: self.service_io_deadline_ms,
                    restart_max: self.restart_max,
                    restart_burst: self.restart_burst,
                },
                faults: self.faults.clone(),
                inject_forbidden: self.inject_forbidden.clone(),
                service_dir: self.service_dir.clone(),
                insecure_no_sandbox: self.insecure_no_sandbox,
                allow_faults: self.allow_faults,
                cgroup: self.cgroup.to_config(),
                jail: self.jail.to_config(),
            },
            ..VmConfig::default()
        }
    }
}

/// One `--disk` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image file (raw).
    pub path: PathBuf,
    /// Read-only: the core opens the file read-only and the device rejects writes.
    pub read_only: bool,
    /// The drive's id, also what the guest reads with GET_ID (its first 20 bytes); default:
    /// `diskN`.
    pub id: Option<String>,
    /// Bytes and requests per second.
    pub rate_limit: RateLimit,
    /// What a host error on a write does (`werror=report|stop|enospc`).
    pub werror: ErrorPolicy,
    /// What a host error on a read does (`rerror=report|stop|enospc`).
    pub rerror: ErrorPolicy,
}

impl DiskSpec {
    /// Parses `PATH[,ro][,id=NAME]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or("--disk needs a path")?;
        let mut spec = Self {
            path: PathBuf::from(path),
            read_only: false,
            id: None,
            rate_limit: RateLimit::default(),
            werror: ErrorPolicy::Report,
            rerror: ErrorPolicy::Report,
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => spec.read_only = true,
                None if opt == "rw" => spec.read_only = false,
                Some(("id", id)) if crate::config::check_id("drive", id).is_ok() => spec.id = Some(id.to_string()),
                Some(("id", _)) => {
                    return Err(format!("disk id must be 1 to {} of [A-Za-z0-9_]", crate::config::MAX_ID))
                }
                Some(("werror", p)) => spec.werror = ErrorPolicy::parse(p)?,
                Some(("rerror", p)) => spec.rerror = ErrorPolicy::parse(p)?,
                Some((key, value)) if rate_option(&mut spec.rate_limit, key, value, "ops")? => {}
                _ => {
                    return Err(format!(
                        "unknown disk option `{opt}` (expected ro, rw, id=NAME, bw=RATE, bw-burst=SIZE, ops=N, ops-burst=N, \
                         werror=POLICY or rerror=POLICY)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

/// Parses a byte count with an optional binary suffix: `1048576`, `512K`, `10M`, `1G` (also
/// `KiB`/`MiB`/`GiB`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 20),
        Some(b'G' | b'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size `{s}` (expected N, NK, NM or NG)"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size `{s}` too large"))
}

/// Largest rate or burst accepted (bytes or operations): 1 TiB.
const RATE_MAX: u64 = 1 << 40;

/// Applies a rate-limit option (`bw`, `bw-burst`, `<ops>`, `<ops>-burst`) to `limit`. Returns
/// `Ok(false)` if `key` is not one.
fn rate_option(limit: &mut RateLimit, key: &str, value: &str, ops: &str) -> Result<bool, String> {
    let slot = match key {
        "bw" => &mut limit.bytes_per_sec,
        "bw-burst" => &mut limit.bytes_burst,
        k if k == ops => &mut limit.ops_per_sec,
        k if k.strip_suffix("-burst") == Some(ops) => &mut limit.ops_burst,
        _ => return Ok(false),
    };
    let n = if key.starts_with("bw") {
        parse_bytes(value)?
    } else {
        value.parse().map_err(|_| format!("bad {key} `{value}` (a whole number)"))?
    };
    if n > RATE_MAX {
        return Err(format!("{key}={value} is above the largest accepted value ({RATE_MAX})"));
    }
    *slot = n;
    Ok(true)
}

/// One `--net` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The TAP interface (created if it does not exist and the core may create it).
    pub tap: String,
    /// The guest's MAC address; default: a locally administered one made from the core's pid
    /// and the device's index.
    pub mac: Option<[u8; 6]>,
    /// Instance name; default: `netN`.
    pub id: Option<String>,
    /// Bytes and frames per second, each way.
    pub rate_limit: RateLimit,
}

impl NetSpec {
    /// Parses `tap=NAME[,mac=MAC][,id=NAME][,bw=RATE][,pps=N]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut spec = Self { tap: String::new(), mac: None, id: None, rate_limit: RateLimit::default() };
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) => {
                    crate::config::check_tap_name(name).map_err(|_| {
                        format!("bad TAP name `{name}` (1 to {} bytes, no '/')", crate::tap::MAX_NAME)
                    })?;
                    tap = Some(name.to_string());
                }
                Some(("mac", mac)) => spec.mac = Some(parse_mac(mac)?),
                Some(("id", id)) if crate::config::check_id("network interface", id).is_ok() => {
                    spec.id = Some(id.to_string())
                }
                Some(("id", _)) => {
                    return Err(format!("net id must be 1 to {} of [A-Za-z0-9_]", crate::config::MAX_ID))
                }
                Some((key, value)) if rate_option(&mut spec.rate_limit, key, value, "pps")? => {}
                _ => {
                    return Err(format!(
                        "unknown net option `{opt}` (expected tap=NAME, mac=MAC, id=NAME, bw=RATE, bw-burst=SIZE, pps=N or pps-burst=N)"
                    ))
                }
            }
        }
        spec.tap = tap.ok_or("--net needs tap=NAME")?;
        Ok(spec)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast (and broadcast) and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    s.parse::<MacAddr>().map(|m| m.0)
}

fn parse_vm_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err("a VM name is 1 to 64 of [A-Za-z0-9_-]".into());
    }
    Ok(s.to_string())
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse().map_err(|_| format!("unknown log level `{s}` (error, warn, info, debug, trace, off)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A parsed command line with a subcommand.
    struct Parsed {
        command: Command,
    }

    fn parse(args: &[&str]) -> Result<Parsed, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("bulkhead").chain(args.iter().copied()))?;
        Ok(Parsed { command: cli.command.expect("a subcommand") })
    }

    fn top(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bulkhead").chain(args.iter().copied()))
    }

    #[test]
    fn firecracker_style_command_line() {
        let c = top(&["--api-sock", "/tmp/a.sock", "--id", "vm1"]).expect("parse");
        assert!(c.command.is_none());
        assert_eq!(c.vmm.api_sock.as_deref(), Some(std::path::Path::new("/tmp/a.sock")));
        assert_eq!(c.vmm.id.as_deref(), Some("vm1"));
        let c = top(&["--no-api", "--config-file", "/c.json"]).expect("parse");
        assert!(c.vmm.no_api && c.vmm.config_file.is_some());
        assert!(top(&["--no-api"]).is_err(), "--no-api needs --config-file");
        assert!(top(&["--version"]).expect("parse").vmm.version);
        // What firecracker-go-sdk passes is accepted.
        assert!(top(&["--api-sock", "/s", "--id", "x", "--no-seccomp"]).is_ok());
        assert!(top(&["--api-sock", "/s", "--seccomp-level", "0"]).is_ok());
        assert!(top(&["--bogus"]).is_err());
        assert!(matches!(parse(&["ls"]).expect("ls").command, Command::Ls(_)));
        assert!(
            matches!(parse(&["stop", "vm1", "--timeout", "3"]).expect("stop").command, Command::Stop(s) if s.timeout == 3)
        );
        assert!(matches!(parse(&["kill", "vm1"]).expect("kill").command, Command::Kill(_)));
    }

    #[test]
    fn defaults() {
        let Command::Run(r) = parse(&["run", "--kernel", "/k"]).expect("parse").command else { panic!("not run") };
        assert_eq!(r.mem, 128);
        assert_eq!(r.vcpus, 1);
        assert_eq!(r.serial_output, "stdout");
        assert_eq!(r.serial_input, "stdin");
        assert!(!r.insecure_no_sandbox, "the sandbox is on by default");
        let Command::Run(r) = parse(&["run", "--kernel", "/k", "--insecure-no-sandbox"]).expect("parse").command else {
            panic!("not run")
        };
        assert!(r.insecure_no_sandbox);
    }

    #[test]
    fn bad_flags_are_errors() {
        assert!(parse(&["run"]).is_err(), "kernel is required");
        assert!(parse(&["run", "--kernel", "/k", "--bogus"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--mem", "0"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--vcpus", "33"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--serial-input", "tty"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--disk", "/d,rx"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--disk", ",ro"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--disk", "/d,id=a-b"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--disk", &format!("/d,id={}", "x".repeat(65))]).is_err());
    }

    #[test]
    fn inject_forbidden_parses_into_specs() {
        let Command::Run(r) = parse(&[
            "run",
            "--kernel",
            "/k",
            "--inject-forbidden",
            "console:execve@300",
            "--inject-forbidden",
            "block1:write-outside-root@0",
        ])
        .expect("parse")
        .command
        else {
            panic!("not run")
        };
        assert_eq!(
            r.inject_forbidden,
            vec![
                InjectSpec {
                    device: "console".into(),
                    action: ipc::control::ForbiddenAction::Execve,
                    delay: Duration::from_millis(300)
                },
                InjectSpec {
                    device: "block1".into(),
                    action: ipc::control::ForbiddenAction::WriteOutsideRoot,
                    delay: Duration::ZERO
                },
            ]
        );
        for bad in ["console:execve", "console@3", "console:fork@1", "console:execve@-1", "console:execve@9999999"] {
            assert!(InjectSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_args_build_the_vm_config() {
        let Command::Run(r) = parse(&[
            "run",
            "--kernel",
            "/k",
            "--mem",
            "256",
            "--disk",
            "/a.img",
            "--disk",
            "/b.img,ro,id=data,bw=1M",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:07,pps=100",
            "--fault",
            "data:kill,every=1s",
            "--serial-input",
            "none",
        ])
        .expect("parse")
        .command
        else {
            panic!("not run")
        };
        let c = r.to_config();
        c.validate().expect("valid");
        assert_eq!(c.machine_config.mem_size_mib, 256);
        assert_eq!(c.drives[0].drive_id, "disk0");
        assert_eq!((c.drives[1].drive_id.as_str(), c.drives[1].read_only()), ("data", true));
        let bw = c.drives[1].rate_limiter.expect("limited").to_rate_limit().expect("valid");
        // 10 ms of 1 MiB/s is 10485.76 bytes: the bucket holds 10485, so the rate is 0.007 % low.
        assert!(bw.bytes_per_sec.abs_diff(1 << 20) < (1 << 20) / 1000, "{}", bw.bytes_per_sec);
        let n = &c.network_interfaces[0];
        assert_eq!((n.iface_id.as_str(), n.host_dev_name.as_str()), ("net0", "tap0"));
        assert_eq!(n.rx_rate_limiter, n.tx_rate_limiter, "the command line limits both ways alike");
        assert_eq!(n.rx_rate_limiter.expect("rx").to_rate_limit().expect("valid").ops_per_sec, 100);
        assert_eq!(c.plan().resolve("data"), c.plan().resolve("block1"));
        assert!(!c.console_reads_stdin());
        assert_eq!(c.kernel_cmdline(), "console=ttyS0 reboot=k panic=1", "no root drive, no root=");
    }

    #[test]
    fn supervision_flags() {
        let Command::Run(r) = parse(&["run", "--kernel", "/k"]).expect("parse").command else { panic!("not run") };
        assert_eq!(r.restart_max, RestartCap { max: 20, window: Duration::from_secs(10) });
        assert_eq!(r.restart_burst, RestartCap { max: 3, window: Duration::from_secs(1) });
        assert_eq!(r.service_liveness_ms, 250);
        assert!(r.faults.is_empty() && r.id.is_none());
        let Command::Run(r) = parse(&["run", "--kernel", "/k", "--service-liveness-ms", "0"]).expect("parse").command
        else {
            panic!("not run")
        };
        assert_eq!(r.service_liveness_ms, 0, "0 disables the check");
        assert!(parse(&["run", "--kernel", "/k", "--service-liveness-ms", "-5"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--service-liveness-ms", "700000"]).is_err());
        let Command::Run(r) = parse(&[
            "run",
            "--kernel",
            "/k",
            "--restart-max",
            "0/1",
            "--name",
            "vm-1",
            "--fault",
            "console:kill,every=1s",
        ])
        .expect("parse")
        .command
        else {
            panic!("not run")
        };
        assert_eq!(r.restart_max.max, 0);
        assert_eq!(r.id.as_deref(), Some("vm-1"));
        assert_eq!(r.faults.len(), 1);
        assert!(parse(&["run", "--kernel", "/k", "--restart-max", "x/1"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--restart-max", "5/0"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--name", "../x"]).is_err());
        let Command::Fault(f) = parse(&["fault", "vm1", "console", "slow=5"]).expect("parse").command else {
            panic!("not fault")
        };
        assert_eq!((f.vm.as_str(), f.device.as_str(), f.action), ("vm1", "console", Some(FaultAction::Slow { ms: 5 })));
        assert!(parse(&["fault", "vm1", "console", "explode"]).is_err());
        assert!(matches!(parse(&["stats", "vm1"]).expect("parse").command, Command::Stats(_)));
        let Command::Set(s) = parse(&["set", "vm1", "--cpu-weight", "300", "--memory-max", "1G"]).expect("set").command
        else {
            panic!("set")
        };
        let r = s.resources.to_resources();
        assert_eq!((r.cpu_weight, r.memory_max), (Some(300), Some(1 << 30)));
        assert!(matches!(
            parse(&["inspect", "vm1", "--json"]).expect("parse").command,
            Command::Inspect(InspectArgs { json: true, .. })
        ));
    }

    #[test]
    fn disks_repeat() {
        let Command::Run(r) = parse(&["run", "--kernel", "/k", "--disk", "/a.img", "--disk", "/b.img,ro,id=data"])
            .expect("parse")
            .command
        else {
            panic!("not run")
        };
        assert_eq!(r.disks.len(), 2);
        assert_eq!(
            r.disks[0],
            DiskSpec {
                path: "/a.img".into(),
                read_only: false,
                id: None,
                rate_limit: RateLimit::default(),
                werror: ErrorPolicy::Report,
                rerror: ErrorPolicy::Report
            }
        );
        assert_eq!(
            r.disks[1],
            DiskSpec {
                path: "/b.img".into(),
                read_only: true,
                id: Some("data".into()),
                rate_limit: RateLimit::default(),
                werror: ErrorPolicy::Report,
                rerror: ErrorPolicy::Report
            }
        );
        let d = DiskSpec::parse("/c.img,werror=stop,rerror=enospc").expect("policies");
        assert_eq!((d.werror, d.rerror), (ErrorPolicy::Stop, ErrorPolicy::Enospc));
        assert!(DiskSpec::parse("/c.img,werror=ignore").is_err(), "only report, stop and enospc");
    }

    #[test]
    fn rate_limits_parse_with_suffixes_and_refuse_garbage() {
        let d = DiskSpec::parse("/d.img,bw=10M,ops=500,bw-burst=64K,ops-burst=8").expect("disk");
        assert_eq!(
            d.rate_limit,
            RateLimit {
                bytes_per_sec: 10 << 20,
                bytes_burst: 64 << 10,
                ops_per_sec: 500,
                ops_burst: 8,
                ..RateLimit::default()
            }
        );
        assert_eq!(parse_bytes("3MiB"), Ok(3 << 20));
        assert_eq!(parse_bytes("7"), Ok(7));
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("99999999999G").is_err());
        assert!(DiskSpec::parse("/d.img,bw=fast").is_err());
        assert!(DiskSpec::parse("/d.img,pps=5").is_err(), "pps is the net option");
        assert!(DiskSpec::parse("/d.img,bw=2T").is_err());
        let n = NetSpec::parse("tap=bh0,bw=1M,pps=1000").expect("net");
        assert_eq!(n.rate_limit.bytes_per_sec, 1 << 20);
        assert_eq!(n.rate_limit.ops_per_sec, 1000);
        assert!(NetSpec::parse("tap=bh0,ops=5").is_err(), "ops is the disk option");
    }

    #[test]
    fn net_specs_parse_and_refuse_bad_input() {
        let Command::Run(r) =
            parse(&["run", "--kernel", "/k", "--net", "tap=bh0", "--net", "id=lan,tap=bh1,mac=02:aa:bb:cc:dd:0e"])
                .expect("parse")
                .command
        else {
            panic!("not run")
        };
        assert_eq!(r.nets.len(), 2);
        assert_eq!(r.nets[0], NetSpec { tap: "bh0".into(), mac: None, id: None, rate_limit: RateLimit::default() });
        assert_eq!(r.nets[1].mac, Some([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e]));
        assert_eq!(r.nets[1].id.as_deref(), Some("lan"));
        for bad in [
            "",
            "mac=02:00:00:00:00:01",
            "tap=",
            "tap=a/b",
            "tap=0123456789abcdef",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=00:00:00:00:00:00",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,mac=02:00:00:00:00:01:02",
            "tap=t,mac=zz:00:00:00:00:01",
            "tap=t,id=",
            "tap=t,id=a b",
            "tap=t,speed=1",
        ] {
            assert!(NetSpec::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(InjectSpec::parse("net1:mount@5").map(|s| s.device), Ok("net1".to_string()));
    }
}
