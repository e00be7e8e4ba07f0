//! The HTTP API on a Unix socket: a compatible subset of Firecracker's, plus Bulkhead's own
//! endpoints under `/bulkhead/` (docs/API.md lists every one).
//!
//! HTTP is [`crate::http`]'s (hyper, one thread per connection, the peer's credentials checked);
//! bodies are JSON (serde), at most [`MAX_BODY`] bytes. Requests that change the VM become a
//! [`VmmAction`] sent to the VMM thread, which applies them in order; reads are answered from
//! the [`VmmView`] the VMM publishes and from the devices' live counters, so a slow action (a
//! pause waiting for its acknowledgements) never holds up a `GET` or another client, and no
//! request ever runs on a vCPU thread. Errors are `400` with `{"fault_message": "..."}`, as
//! Firecracker answers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use ipc::control::FaultAction;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{
    BootSource, DriveConfig, DriveUpdate, LoggerConfig, MachineConfig, MachineConfigUpdate, MetricsConfig,
    NetworkInterface, NetworkInterfaceUpdate, RestartCap,
};
use crate::http::{Handler, HttpRequest, HttpServer, PeerPolicy, Verb};
use crate::service::SupervisionUpdate;
use crate::vmm::{ApiCall, SharedView, VmState, VmmAction, VmmView};

/// Largest request body accepted (Firecracker's default).
pub const MAX_BODY: usize = 51_200;
/// Longest wait for the VMM thread to apply an action.
const ACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The name `GET /` reports.
pub const APP_NAME: &str = "Bulkhead";
/// Bulkhead's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Firecracker API version whose subset Bulkhead serves (the one firecracker-go-sdk's
/// models are generated from).
pub const FIRECRACKER_API_VERSION: &str = "1.4.1";

/// Errors of the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("API socket {}: {reason}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The HTTP server could not be started.
    #[error("starting the API server")]
    Http(#[source] crate::http::HttpError),
}

/// A running API server. Dropping it stops it and removes the socket file.
pub struct ApiServer {
    _http: HttpServer,
    path: PathBuf,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("path", &self.path).finish()
    }
}

/// What the workers share.
#[derive(Clone)]
struct Ctx {
    view: SharedView,
    actions: Sender<ApiCall>,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file there is replaced; one a live VMM answers on is
    /// refused) and serves `view`, sending actions to `actions`. Only root and this process's
    /// effective uid get answers ([`PeerPolicy::own_uid`]).
    pub fn start(
        path: &Path,
        view: SharedView,
        actions: Sender<ApiCall>,
        confine: Option<bulkhead_policies::Policy>,
    ) -> Result<Self, ApiError> {
        let bind_err = |reason: String| ApiError::Bind { path: path.to_path_buf(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| bind_err(e.to_string()))?;
        }
        if path.parent() == Some(Path::new(crate::api_client::RUNTIME_DIR)) {
            // Bulkhead's own directory of VM sockets: for root only, whoever made it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(crate::api_client::RUNTIME_DIR, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| bind_err(e.to_string()))?;
        }
        remove_stale_socket(path).map_err(bind_err)?;
        let listener = bind_private(path).map_err(|e| bind_err(e.to_string()))?;
        let ctx = Ctx { view, actions };
        let handler: Arc<Handler> = Arc::new(move |req: &HttpRequest| route(&req.verb, &req.path, &req.body, &ctx));
        let http = HttpServer::start(listener, path.to_path_buf(), handler, PeerPolicy::own_uid(), MAX_BODY, confine)
            .map_err(|e| {
            let _ = std::fs::remove_file(path);
            ApiError::Http(e)
        })?;
        *SOCKET.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.to_path_buf());
        log::info!("API listening at {}", path.display());
        Ok(Self { _http: http, path: path.to_path_buf() })
    }
}

/// The socket this process serves its API on (the VM's helper removes it once the jailed core,
/// which may no longer write the socket's directory, has exited).
static SOCKET: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The path of this process's API socket, if it serves one.
pub fn socket_path() -> Option<PathBuf> {
    SOCKET.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Clears the way for a socket at `path`: nothing there, or a socket nobody answers on (left by
/// a VMM that died), which is removed. A live socket, and anything that is not a socket (a disk
/// image given by mistake), are refused and left as they are.
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.file_type().is_socket() {
        return Err("it exists and is not a socket; refusing to replace it".into());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err("another VMM is listening there".into());
    }
    std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket: {e}"))
}

/// Binds a socket that only its owner (and root) can connect to at `path`, with no moment where
/// it exists with looser permissions: bound in a fresh 0700 directory next to `path`, made 0600,
/// then renamed into place (never over anything that appeared there meanwhile).
fn bind_private(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = private_dir(dir)?;
    let bound = (|| {
        let tmp = staging.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        nix::fcntl::renameat2(None, &tmp, None, path, nix::fcntl::RenameFlags::RENAME_NOREPLACE)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(staging.join("s"));
    let _ = std::fs::remove_dir(&staging);
    bound
}

/// A new directory in `parent` only this process's uid can enter (`mkdir` fails rather than
/// reuse one that exists).
fn private_dir(parent: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for attempt in 0..8u32 {
        let p = parent.join(format!(".bh-{}-{:x}", crate::pidns::host_pid(), nanos.wrapping_add(attempt)));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no directory created")))
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body (empty for 204).
    pub body: String,
    /// Content type of the body.
    pub content_type: &'static str,
}

impl Reply {
    fn no_content() -> Self {
        Self { status: 204, body: String::new(), content_type: "application/json" }
    }

    fn json<T: Serialize>(v: &T) -> Self {
        match serde_json::to_string(v) {
            Ok(body) => Self { status: 200, body, content_type: "application/json" },
            Err(e) => Self::error(format!("cannot encode the answer: {e}")),
        }
    }

    /// A 400 with Firecracker's error body.
    pub fn error(msg: impl Into<String>) -> Self {
        Self::fault(400, msg)
    }

    /// Status `status` with Firecracker's error body.
    pub fn fault(status: u16, msg: impl Into<String>) -> Self {
        let body = serde_json::json!({ "fault_message": msg.into() }).to_string();
        Self { status, body, content_type: "application/json" }
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body)
        .map_err(|e| Reply::error(format!("An error occurred when deserializing the json body of a request: {e}.")))
}

/// Applies `action` on the VMM thread and waits for the outcome.
fn act(ctx: &Ctx, action: VmmAction) -> Reply {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if ctx.actions.send(ApiCall { action, reply: tx }).is_err() {
        return Reply::error("the VMM is shutting down");
    }
    match rx.recv_timeout(ACTION_TIMEOUT) {
        Ok(Ok(())) => Reply::no_content(),
        Ok(Err(e)) => Reply::error(e.to_string()),
        Err(_) => Reply::error(format!("the VMM did not answer within {ACTION_TIMEOUT:?}")),
    }
}

fn view(ctx: &Ctx) -> VmmView {
    ctx.view.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `GET /`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The VM's id.
    pub id: String,
    /// `Not started`, `Running`, `Paused`.
    pub state: String,
    /// Bulkhead's version.
    pub vmm_version: String,
    /// `Bulkhead`.
    pub app_name: String,
    /// Why Bulkhead paused the VM itself (a disk's error policy: `drive data: write at sector
    /// 8: No space left on device`), while it is paused for that. A Bulkhead extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
}

/// `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

/// `PATCH /vm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: String,
}

/// `PUT /bulkhead/devices/{id}/fault`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    action: String,
}

/// Firecracker endpoints Bulkhead does not have yet, and why.
const NOT_YET: &[(&str, &str)] = &[
    ("snapshot", "snapshots are not supported yet"),
    ("vsock", "vsock is not supported yet"),
    ("entropy", "the entropy device is not supported yet"),
    ("balloon", "the balloon device is not supported yet"),
    ("mmds", "the MMDS is not planned"),
    ("cpu-config", "custom CPU templates are not supported"),
    ("hotplug", "memory hot-plug is not supported"),
    ("pmem", "pmem devices are not supported"),
    ("serial", "serial output redirection through the API is not supported (use bulkhead run --serial-output)"),
];

/// Answers one request: a pure function of the request and the VMM (through `ctx`).
fn route(method: &Verb, url: &str, body: &[u8], ctx: &Ctx) -> Reply {
    use Verb::{Get, Patch, Put};
    let path = url.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').filter(|p| !p.is_empty()).collect();
    let invalid = || Reply::error(format!("Invalid request method and/or path: {method} {}.", path.trim_matches('/')));
    match (method, parts.as_slice()) {
        (Get, []) => {
            let v = view(ctx);
            Reply::json(&InstanceInfo {
                id: v.id,
                state: v.state.api_name().into(),
                vmm_version: VERSION.into(),
                app_name: APP_NAME.into(),
                state_reason: v.paused_by,
            })
        }
        (Get, ["version"]) => Reply::json(&serde_json::json!({
            "firecracker_version": VERSION,
            "bulkhead_version": VERSION,
        })),
        (Get, ["vm", "config"]) => Reply::json(&view(ctx).config),
        (Get, ["machine-config"]) => Reply::json(&view(ctx).config.machine_config),
        (Put, ["machine-config"]) => match parse::<MachineConfig>(body) {
            Ok(m) => act(ctx, VmmAction::PutMachineConfig(m)),
            Err(r) => r,
        },
        (Patch, ["machine-config"]) => match parse::<MachineConfigUpdate>(body) {
            Ok(m) => act(ctx, VmmAction::PatchMachineConfig(m)),
            Err(r) => r,
        },
        (Put, ["boot-source"]) => match parse::<BootSource>(body) {
            Ok(b) => act(ctx, VmmAction::PutBootSource(b)),
            Err(r) => r,
        },
        (Put, ["drives", id]) => match parse::<DriveConfig>(body) {
            Ok(d) if d.drive_id != *id => id_mismatch(),
            Ok(d) => act(ctx, VmmAction::PutDrive(d)),
            Err(r) => r,
        },
        (Patch, ["drives", id]) => match parse::<DriveUpdate>(body) {
            Ok(d) if d.drive_id != *id => id_mismatch(),
            Ok(d) => patch_drive(ctx, d),
            Err(r) => r,
        },
        (Put, ["network-interfaces", id]) => match parse::<NetworkInterface>(body) {
            Ok(n) if n.iface_id != *id => id_mismatch(),
            Ok(n) => act(ctx, VmmAction::PutNetworkInterface(n)),
            Err(r) => r,
        },
        (Patch, ["network-interfaces", id]) => match parse::<NetworkInterfaceUpdate>(body) {
            Ok(n) if n.iface_id != *id => id_mismatch(),
            Ok(n) => act(ctx, VmmAction::PatchNetworkInterface(n)),
            Err(r) => r,
        },
        (Put, ["actions"]) => match parse::<ActionBody>(body) {
            Ok(a) => match a.action_type.as_str() {
                "InstanceStart" => act(ctx, VmmAction::InstanceStart),
                "SendCtrlAltDel" => act(ctx, VmmAction::SendCtrlAltDel),
                "FlushMetrics" => act(ctx, VmmAction::FlushMetrics),
                other => Reply::error(format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{other}`, \
                     expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`."
                )),
            },
            Err(r) => r,
        },
        (Patch, ["vm"]) => match parse::<VmStateBody>(body) {
            Ok(s) if s.state == "Paused" => act(ctx, VmmAction::Pause),
            Ok(s) if s.state == "Resumed" => act(ctx, VmmAction::Resume),
            Ok(s) => Reply::error(format!(
                "An error occurred when deserializing the json body of a request: unknown variant `{}`, expected \
                 `Paused` or `Resumed`.",
                s.state
            )),
            Err(r) => r,
        },
        (Put, ["logger"]) => match parse::<LoggerConfig>(body) {
            Ok(cfg) => match cfg.log_path.as_deref().map(crate::vmm::open_output).transpose() {
                Ok(file) => act(ctx, VmmAction::PutLogger(cfg, file)),
                Err(e) => Reply::error(format!("Logger error: {e}")),
            },
            Err(r) => r,
        },
        (Put, ["metrics"]) => match parse::<MetricsConfig>(body) {
            Ok(cfg) => match crate::vmm::open_output(&cfg.metrics_path) {
                Ok(file) => act(ctx, VmmAction::PutMetrics(cfg, file)),
                Err(e) => Reply::error(format!("Metrics error: {e}")),
            },
            Err(r) => r,
        },
        (Get, ["bulkhead", "devices"]) => Reply::json(&devices(&view(ctx))),
        (Get, ["bulkhead", "resources"]) => Reply::json(&resources(&view(ctx))),
        (Patch, ["bulkhead", "resources"]) => match parse::<crate::cgroup::Resources>(body) {
            Ok(r) => patch_resources(ctx, &r),
            Err(r) => r,
        },
        (Get, ["bulkhead", "isolation"]) => {
            let v = view(ctx);
            let services: Vec<(String, u32)> =
                v.devices.iter().flat_map(|reg| reg.iter().map(|(d, svc)| (d.service.clone(), svc.pid()))).collect();
            // The jailed core may not read its services' fds and namespaces: its helper reads them.
            match crate::helper::current() {
                Some(h) => match h.report(&v.id, &services) {
                    Ok(r) => Reply::json(&r),
                    Err(e) => Reply::error(crate::vmm::chain(&e)),
                },
                None => Reply::json(&crate::isolation::report(&v.id, &services)),
            }
        }
        (Get, ["bulkhead", "metrics"]) => {
            Reply { status: 200, body: prometheus(&view(ctx)), content_type: "text/plain; version=0.0.4" }
        }
        (Put, ["bulkhead", "devices", _, "fault"]) if !view(ctx).config.bulkhead.allow_faults => Reply::error(
            "fault injection is off for this VM: start it with --allow-faults (or \"allow_faults\": true in the \
             bulkhead section of its configuration)",
        ),
        (Put, ["bulkhead", "devices", id, "fault"]) => match parse::<FaultBody>(body) {
            Ok(f) => match FaultAction::parse(&f.action) {
                Ok(action) => inject(ctx, id, action),
                Err(e) => Reply::error(e),
            },
            Err(r) => r,
        },
        (Get, ["bulkhead", "vm"]) => Reply::json(&vm_summary(&view(ctx))),
        (Get, ["bulkhead", "vcpus"]) => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let r = act(ctx, VmmAction::InspectVcpus(tx));
            match rx.try_recv() {
                Ok(reports) => Reply::json(&reports),
                Err(_) => r,
            }
        }
        (Get, ["bulkhead", "devices", id, "state"]) => device_state(ctx, id),
        (Patch, ["bulkhead", "devices", id]) => match parse::<DevicePatch>(body) {
            Ok(p) => patch_device(ctx, id, &p),
            Err(r) => r,
        },
        (Put, ["bulkhead", "actions"]) => match parse::<BulkheadAction>(body) {
            Ok(a) => match a.action_type.as_str() {
                "Stop" => act(ctx, VmmAction::Stop { grace: Duration::from_secs(a.timeout_s.unwrap_or(10).min(3600)) }),
                "Kill" => act(ctx, VmmAction::Kill),
                other => Reply::error(format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{other}`, \
                     expected `Stop` or `Kill`."
                )),
            },
            Err(r) => r,
        },
        (_, [first, ..]) => match NOT_YET.iter().find(|(p, _)| p == first) {
            Some((_, why)) => Reply::error(format!("{why}: {method} /{}", parts.join("/"))),
            None => invalid(),
        },
        _ => invalid(),
    }
}

/// `PUT /bulkhead/actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkheadAction {
    action_type: String,
    #[serde(default)]
    timeout_s: Option<u64>,
}

/// `GET /bulkhead/vm`: what `bulkhead ls` shows.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSummary {
    /// The VM's id.
    pub id: String,
    /// `Not started`, `Running`, `Paused`, `Stopped`.
    pub state: String,
    /// The core's pid.
    pub pid: u32,
    /// Seconds since the VM started (0 before).
    pub uptime_s: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Devices (the console included).
    pub devices: usize,
    /// Service restarts, all devices together.
    pub restarts: u64,
    /// Why Bulkhead paused the VM itself, while it is paused for that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
}

/// `GET /bulkhead/resources`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcesInfo {
    /// `v1`, `v2`, or `null` when the VM has no cgroup (not started, `--no-cgroup`, not root).
    pub cgroup: Option<String>,
    /// The VM's cgroup, one directory per hierarchy.
    pub paths: Vec<PathBuf>,
    /// The settings in force (before the start: those it will start with).
    pub resources: crate::cgroup::Resources,
    /// CPU time the whole VM has used, in ns (`null` without a cgroup).
    pub cpu_ns: Option<u64>,
    /// Of which the core (its `vmm` child group).
    pub core_cpu_ns: Option<u64>,
}

fn resources(v: &VmmView) -> ResourcesInfo {
    match v.cgroup.as_ref().and_then(|cg| cg.describe().map(|d| (d, cg.resources()))) {
        Some(((version, paths), resources)) => ResourcesInfo {
            cgroup: Some(version.name().into()),
            paths,
            resources,
            cpu_ns: v.cgroup.as_ref().and_then(|cg| cg.cpu_ns(None)),
            core_cpu_ns: v.cgroup.as_ref().and_then(|cg| cg.cpu_ns(Some(crate::cgroup::CORE_CHILD))),
        },
        None => ResourcesInfo {
            cgroup: None,
            paths: Vec::new(),
            resources: v.config.bulkhead.cgroup.resources.clone(),
            cpu_ns: None,
            core_cpu_ns: None,
        },
    }
}

/// `PATCH /bulkhead/resources`: live on a running VM's cgroup and vCPU threads (on this thread:
/// the VMM thread's filter allows neither cgroup writes nor `sched_setaffinity`), into the
/// configuration before the start. Checked in full first: a refused update changes nothing.
fn patch_resources(ctx: &Ctx, update: &crate::cgroup::Resources) -> Reply {
    let v = view(ctx);
    if v.state == VmState::NotStarted {
        return act(ctx, VmmAction::PatchResources(update.clone()));
    }
    let ram = v.config.machine_config.mem_size_mib.saturating_mul(1 << 20);
    if let Err(e) = update.validate(ram) {
        return Reply::error(e.to_string());
    }
    if update.sets_cgroup() && v.cgroup.is_none() {
        return Reply::error("The VM has no cgroup of its own (--no-cgroup, or not started as root).");
    }
    // The pinning first: it is what fails on a host's own terms (CPUs offline).
    if let Some(lists) = &update.vcpu_affinity {
        if let Err(e) = crate::cgroup::pin_vcpus(lists) {
            return Reply::error(e.to_string());
        }
    }
    if let Some(cg) = &v.cgroup {
        match cg.update(update, ram) {
            Ok(_) => {}
            Err(e) => return Reply::error(e.to_string()),
        }
    }
    Reply::no_content()
}

fn vm_summary(v: &VmmView) -> VmSummary {
    let devices = v.devices.as_ref();
    VmSummary {
        id: v.id.clone(),
        state: v.state.api_name().into(),
        pid: v.pid,
        uptime_s: v.started.map_or(0, |(_, t)| t.elapsed().as_secs()),
        vcpus: v.config.machine_config.vcpu_count,
        mem_mib: v.config.machine_config.mem_size_mib,
        devices: devices.map_or(1 + v.config.drives.len() + v.config.network_interfaces.len(), |r| r.iter().count()),
        restarts: devices.map_or(0, |r| r.iter().map(|(_, s)| u64::from(s.metrics().restarts)).sum()),
        state_reason: v.paused_by.clone(),
    }
}

/// `PATCH /bulkhead/devices/{id}`: how the device's service is supervised from now on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicePatch {
    #[serde(default)]
    restart_max: Option<RestartCap>,
    #[serde(default)]
    restart_burst: Option<RestartCap>,
    #[serde(default)]
    service_liveness_ms: Option<u64>,
    #[serde(default)]
    service_deadline_ms: Option<u64>,
}

fn patch_device(ctx: &Ctx, device: &str, p: &DevicePatch) -> Reply {
    if p.service_deadline_ms.is_some_and(|d| !(1..=600_000).contains(&d)) {
        return Reply::error("service_deadline_ms must be 1 to 600000");
    }
    if p.service_liveness_ms.is_some_and(|l| l > 600_000) {
        return Reply::error("service_liveness_ms must be at most 600000");
    }
    let svc = match service_named(ctx, device) {
        Ok(svc) => svc,
        Err(r) => return r,
    };
    if p.restart_max.is_some_and(|r| r.max > 0) && svc.supervision().restart_max.0 == 0 {
        return Reply::error("restarts cannot be turned on for a device started without them");
    }
    svc.set_supervision(&SupervisionUpdate {
        restart_max: p.restart_max.map(|r| (r.max, r.window)),
        restart_burst: p.restart_burst.map(|r| (r.max, r.window)),
        liveness_interval: p.service_liveness_ms.map(Duration::from_millis),
        call_timeout: p.service_deadline_ms.map(Duration::from_millis),
    });
    Reply::no_content()
}

/// Longest an injection waits for a live instance of its service.
const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// `PUT /bulkhead/devices/{id}/fault`, on this (API) thread: the VMM thread is not involved, so
/// an injection that waits for a restarting service holds up nothing else.
fn inject(ctx: &Ctx, device: &str, action: FaultAction) -> Reply {
    let svc = match service_named(ctx, device) {
        Ok(svc) => svc,
        Err(r) => return r,
    };
    if svc.device().is_failed() {
        return Reply::error(format!(
            "device {} has failed: {}",
            svc.name(),
            svc.device().failure().unwrap_or_default()
        ));
    }
    if !svc.wait_alive(None, HOLD_LIMIT) {
        return Reply::error(format!(
            "device {} has no live instance (restarting for over {HOLD_LIMIT:?})",
            svc.name()
        ));
    }
    match svc.inject(action) {
        Ok(done) => Reply::json(&serde_json::json!({ "result": done })),
        Err(e) => Reply::error(crate::vmm::chain(&e)),
    }
}

/// The service of the device `device` names (an id, `block`, `net0`, a service's name, ...), or
/// the error reply: not started yet, or no such device.
fn service_named(ctx: &Ctx, device: &str) -> Result<crate::service::ServiceRef, Reply> {
    let v = view(ctx);
    let Some(reg) = &v.devices else {
        return Err(Reply::error("The requested operation is not supported before starting the microVM."));
    };
    match reg.resolve(device) {
        Some((_, svc)) => Ok(svc.clone()),
        None => Err(Reply::error(format!("no device `{device}` (have: {})", reg.names()))),
    }
}

/// `GET /bulkhead/devices/{id}/state`: the device's live state, as its service reports it
/// (registers, the exit ring, the guest's rings beside the device's positions).
fn device_state(ctx: &Ctx, device: &str) -> Reply {
    let svc = match service_named(ctx, device) {
        Ok(svc) => svc,
        Err(r) => return r,
    };
    // A device past its restart cap has a last instance to look at (unless it fails closed,
    // which `inspect` says); one being replaced is waited for.
    if !svc.device().is_failed() && !svc.wait_alive(None, HOLD_LIMIT) {
        return Reply::error(format!(
            "device {} has no live instance (restarting for over {HOLD_LIMIT:?})",
            svc.name()
        ));
    }
    match svc.inspect(INSPECT_LIMIT) {
        Ok(report) => Reply::json(&serde_json::json!({ "service": svc.name(), "pid": svc.pid(), "report": report })),
        Err(e) => Reply::error(crate::vmm::chain(&e)),
    }
}

/// How long a service has to answer an inspection.
const INSPECT_LIMIT: Duration = Duration::from_secs(2);

fn id_mismatch() -> Reply {
    Reply::error("The id from the path does not match the id from the body!")
}

/// `PATCH /drives/{id}`: a new image is opened here, on the API thread (the VMM thread keeps
/// to what its seccomp filter allows), with the drive's access mode.
fn patch_drive(ctx: &Ctx, update: DriveUpdate) -> Reply {
    let file = match &update.path_on_host {
        None => None,
        Some(path) => {
            let (read_only, current) = {
                let v = ctx.view.read().unwrap_or_else(|e| e.into_inner());
                match v.config.drives.iter().find(|d| d.drive_id == update.drive_id) {
                    Some(d) => (d.read_only(), d.path_on_host.clone()),
                    None => return Reply::error(format!("no drive `{}`", update.drive_id)),
                }
            };
            match crate::image::open(path, read_only) {
                Ok(f) => Some(f),
                // The drive's own (locked) image named again: nothing to swap.
                Err(crate::image::ImageError::Locked { .. })
                    if current.as_deref().is_some_and(|c| same_image(path, c)) =>
                {
                    return Reply::error(format!(
                        "{} is already the image of drive `{}`; give a different image to swap it",
                        path.display(),
                        update.drive_id
                    ))
                }
                Err(e) => return Reply::error(crate::vmm::chain(&e)),
            }
        }
    };
    act(ctx, VmmAction::PatchDrive(update, file))
}

/// Whether paths `a` and `b` name the same file.
fn same_image(a: &std::path::Path, b: &std::path::Path) -> bool {
    std::fs::File::open(a).is_ok_and(|f| crate::image::same_file(&f, b))
}

/// One entry of `GET /bulkhead/devices`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The user's id (`console`, a drive id, an interface id).
    pub id: String,
    /// `console`, `block`, `net`.
    pub kind: String,
    /// The service instance's name.
    pub service: String,
    /// The current instance's pid.
    pub pid: u32,
    /// CPU time the service's cgroup has used (every instance), in ns; `null` without a cgroup.
    #[serde(default)]
    pub cpu_ns: Option<u64>,
    /// `serving`, `paused`, `restarting` or `failed`.
    pub state: String,
    /// Restarts so far.
    pub restarts: u32,
    /// Why the last failed instance failed.
    pub last_failure: Option<String>,
    /// Why the device failed for good, if it did.
    pub failed: Option<String>,
    /// Device requests the instances found in flight and redid.
    pub requests_redone: u64,
    /// Exits forwarded to the service.
    pub exits_forwarded: u64,
    /// Reads answered in the core from the service's read mirror.
    pub exits_mirrored: u64,
    /// Writes posted to the service without the vCPU waiting for it.
    pub exits_posted: u64,
    /// Restart cap in force (`N/SECS`).
    pub restart_max: String,
    /// Immediate restarts tolerated (`N/SECS`).
    pub restart_burst: String,
    /// Liveness ping interval in ms (0: off).
    pub service_liveness_ms: u64,
    /// Deadline of a forwarded exit or a ping, in ms.
    pub service_deadline_ms: u64,
}

fn devices(v: &VmmView) -> Vec<DeviceInfo> {
    let Some(reg) = &v.devices else { return Vec::new() };
    reg.iter()
        .map(|(d, svc)| {
            let m = svc.metrics();
            let sup = svc.supervision();
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            DeviceInfo {
                id: d.user_id.clone(),
                kind: d.kind.to_string(),
                service: d.service.clone(),
                pid: svc.pid(),
                cpu_ns: v.cgroup.as_ref().and_then(|cg| cg.cpu_ns(Some(&d.service))),
                state: svc.state().as_str().into(),
                restarts: m.restarts,
                last_failure: svc.last_failure(),
                failed: m.failed,
                requests_redone: m.requests_redone,
                exits_forwarded: m.exits_forwarded,
                exits_mirrored: m.exits_mirrored,
                exits_posted: m.exits_posted,
                restart_max: format!("{}/{}", sup.restart_max.0, sup.restart_max.1.as_secs()),
                restart_burst: format!("{}/{}", sup.restart_burst.0, sup.restart_burst.1.as_secs()),
                service_liveness_ms: ms(sup.liveness_interval),
                service_deadline_ms: ms(sup.call_timeout),
            }
        })
        .collect()
}

/// Upper bounds (seconds) of the death → serving histogram.
const RESTART_BUCKETS: [f64; 8] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0];

/// `GET /bulkhead/metrics`: the Prometheus text format.
pub fn prometheus(v: &VmmView) -> String {
    let mut out = String::new();
    let vm = escape_label(&v.id);
    let _ = writeln!(out, "# HELP bulkhead_vm_running Whether the VM runs (1), is paused (0.5) or not (0).");
    let _ = writeln!(out, "# TYPE bulkhead_vm_running gauge");
    let running = match v.state {
        crate::vmm::VmState::Running => "1",
        crate::vmm::VmState::Paused => "0.5",
        _ => "0",
    };
    let _ = writeln!(out, "bulkhead_vm_running{{vm=\"{vm}\"}} {running}");
    let _ = writeln!(out, "# HELP bulkhead_vcpu_exits_total VM exits each vCPU handled.");
    let _ = writeln!(out, "# TYPE bulkhead_vcpu_exits_total counter");
    for (i, c) in v.vcpu_exits.iter().enumerate() {
        let _ = writeln!(out, "bulkhead_vcpu_exits_total{{vm=\"{vm}\",vcpu=\"{i}\"}} {}", c.load(Ordering::Relaxed));
    }
    let Some(reg) = &v.devices else { return out };
    type Metric = (&'static str, &'static str, &'static str);
    const METRICS: [Metric; 13] = [
        ("bulkhead_device_restarts_total", "counter", "Times the device's service was restarted."),
        ("bulkhead_device_failed", "gauge", "Whether the device failed for good."),
        ("bulkhead_exits_forwarded_total", "counter", "Exits forwarded to the service."),
        ("bulkhead_exits_mirrored_total", "counter", "Reads answered in the core from the service's read mirror."),
        ("bulkhead_exits_posted_total", "counter", "Writes posted to the service without the vCPU waiting."),
        ("bulkhead_exits_redone_total", "counter", "Exits in flight at a failure, completed by the next instance."),
        ("bulkhead_requests_redone_total", "counter", "Device requests a new instance found in flight and redid."),
        (
            "bulkhead_device_requests_total",
            "counter",
            "Requests (block) or frames (net) the current instance completed.",
        ),
        ("bulkhead_device_bytes_to_guest_total", "counter", "Bytes to the guest (current instance)."),
        ("bulkhead_device_bytes_from_guest_total", "counter", "Bytes from the guest (current instance)."),
        ("bulkhead_device_throttled_total", "counter", "Times work waited for rate-limit tokens (current instance)."),
        (
            "bulkhead_device_errors_total",
            "counter",
            "Requests answered with an error, frames dropped, or console output bytes dropped for a stalled reader.",
        ),
        (
            "bulkhead_device_host_io_errors_total",
            "counter",
            "Host I/O errors (EIO, ENOSPC, ...) the device met, reported to the guest or held (current instance).",
        ),
    ];
    let mut rows: Vec<[u64; 13]> = Vec::new();
    let mut labels = Vec::new();
    let mut histograms = Vec::new();
    for (d, svc) in reg.iter() {
        let m = svc.metrics();
        // A short ping for the device's own counters; a restarting service just reports zeros.
        let io = svc.stats(Duration::from_millis(200)).map(|s| s.io).unwrap_or_default();
        rows.push([
            u64::from(m.restarts),
            u64::from(m.failed.is_some()),
            m.exits_forwarded,
            m.exits_mirrored,
            m.exits_posted,
            m.exits_redone,
            m.requests_redone,
            io.requests,
            io.bytes_to_guest,
            io.bytes_from_guest,
            io.throttled,
            io.errors,
            io.host_errors,
        ]);
        labels.push(format!("vm=\"{vm}\",device=\"{}\",kind=\"{}\"", escape_label(&d.user_id), d.kind));
        histograms.push(svc.restart_latencies());
    }
    for (k, (name, kind, help)) in METRICS.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (row, l) in rows.iter().zip(&labels) {
            let _ = writeln!(out, "{name}{{{l}}} {}", row[k]);
        }
    }
    let name = "bulkhead_device_restart_seconds";
    let _ = writeln!(out, "# HELP {name} Time from a service's failure to its replacement serving.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (samples, l) in histograms.iter().zip(&labels) {
        for le in RESTART_BUCKETS {
            let n = samples.iter().filter(|d| d.as_secs_f64() <= le).count();
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", samples.len());
        let sum: f64 = samples.iter().map(Duration::as_secs_f64).sum();
        let _ = writeln!(out, "{name}_sum{{{l}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{l}}} {}", samples.len());
    }
    out
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One line of the metrics file (`PUT /metrics`, written on `FlushMetrics` and every 60 s): a
/// JSON object with the time, the VM's state, its vCPUs' exits and each device's supervision
/// counters, plus Firecracker's aggregate `block` and `net` objects (the keys Kata reads) filled
/// from the services' own counters (those of the current instances).
pub fn metrics_json(v: &VmmView) -> String {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let vcpu_exits: Vec<u64> = v.vcpu_exits.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let devices: Vec<serde_json::Value> =
        devices(v).into_iter().map(|d| serde_json::to_value(d).unwrap_or(serde_json::Value::Null)).collect();
    let (mut block, mut net) = (ipc::control::IoCounters::default(), ipc::control::IoCounters::default());
    if let Some(reg) = &v.devices {
        for (d, svc) in reg.iter() {
            let io = svc.stats(Duration::from_millis(200)).map(|s| s.io).unwrap_or_default();
            let sum = match d.kind {
                crate::config::DeviceKind::Block => &mut block,
                crate::config::DeviceKind::Net => &mut net,
                crate::config::DeviceKind::Console => continue,
            };
            sum.accumulate(&io);
        }
    }
    serde_json::json!({
        "utc_timestamp_ms": now_ms,
        "vm": { "id": v.id, "state": v.state.api_name(), "vcpu_exits": vcpu_exits },
        "devices": devices,
        "block": {
            "read_bytes": block.bytes_to_guest,
            "write_bytes": block.bytes_from_guest,
            "rate_limiter_throttled_events": block.throttled,
            "invalid_reqs_count": block.errors,
        },
        "net": {
            "rx_bytes_count": net.bytes_to_guest,
            "tx_bytes_count": net.bytes_from_guest,
            "rx_packets_count": net.requests,
            "rate_limiter_throttled_events": net.throttled,
        },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;
    use crate::vmm::{ActionError, VmState};
    use std::sync::RwLock;

    /// A context whose VMM thread answers every action with `answer` and records it.
    fn ctx(answer: fn(&VmmAction) -> Result<(), ActionError>) -> (Ctx, Arc<std::sync::Mutex<Vec<String>>>) {
        let view = Arc::new(RwLock::new(VmmView {
            id: "vm1".into(),
            state: VmState::NotStarted,
            config: VmConfig::default(),
            devices: None,
            started: None,
            pid: 1,
            vcpu_exits: Vec::new(),
            paused_by: None,
            cgroup: None,
        }));
        let (tx, rx) = crossbeam_channel::unbounded::<ApiCall>();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for call in rx {
                s.lock().expect("seen").push(format!("{:?}", call.action));
                let _ = call.reply.send(answer(&call.action));
            }
        });
        (Ctx { view, actions: tx }, seen)
    }

    fn req(ctx: &Ctx, method: &str, url: &str, body: &str) -> Reply {
        let m = Verb::from(method);
        route(&m, url, body.as_bytes(), ctx)
    }

    fn fault(r: &Reply) -> String {
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        v["fault_message"].as_str().expect("fault_message").to_string()
    }

    #[test]
    fn reads_come_from_the_view() {
        let (c, seen) = ctx(|_| Ok(()));
        let r = req(&c, "GET", "/", "");
        assert_eq!(r.status, 200);
        let info: InstanceInfo = serde_json::from_str(&r.body).expect("info");
        assert_eq!((info.id.as_str(), info.state.as_str(), info.app_name.as_str()), ("vm1", "Not started", "Bulkhead"));
        assert_eq!(
            req(&c, "GET", "/machine-config", "").body,
            serde_json::to_string(&MachineConfig::default()).expect("json")
        );
        let cfg: VmConfig = serde_json::from_str(&req(&c, "GET", "/vm/config", "").body).expect("config");
        assert_eq!(cfg, VmConfig::default());
        assert_eq!(req(&c, "GET", "/bulkhead/devices", "").body, "[]");
        assert!(req(&c, "GET", "/bulkhead/metrics", "").body.contains("bulkhead_vm_running{vm=\"vm1\"} 0"));
        assert!(seen.lock().expect("seen").is_empty(), "no read reached the VMM thread");
    }

    #[test]
    fn writes_become_actions() {
        let (c, seen) = ctx(|_| Ok(()));
        assert_eq!(req(&c, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).status, 204);
        assert_eq!(req(&c, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).status, 204);
        assert_eq!(req(&c, "PATCH", "/vm", r#"{"state": "Paused"}"#).status, 204);
        assert_eq!(req(&c, "PUT", "/bulkhead/actions", r#"{"action_type": "Stop", "timeout_s": 3}"#).status, 204);
        // A fault before the start is refused without bothering the VMM thread.
        assert_eq!(req(&c, "PUT", "/bulkhead/devices/block/fault", r#"{"action": "kill"}"#).status, 400);
        let seen = seen.lock().expect("seen").join("\n");
        assert!(
            seen.contains("PutMachineConfig") && seen.contains("InstanceStart") && seen.contains("Pause"),
            "{seen}"
        );
        assert!(seen.contains("Stop { grace: 3s }"), "{seen}");
    }

    #[test]
    fn bad_requests_get_a_fault_message_and_reach_nothing() {
        let (c, seen) = ctx(|_| Ok(()));
        let cases: [(&str, &str, &str, &str); 10] = [
            ("GET", "/foo", "", "Invalid request method and/or path: GET foo."),
            ("DELETE", "/", "", "Invalid request method and/or path: DELETE ."),
            ("PUT", "/boot-source", "{bad json", "deserializing the json body"),
            ("PUT", "/boot-source", r#"{"kernel_image_path": "/k", "foo": 1}"#, "unknown field `foo`"),
            (
                "PUT",
                "/drives/a",
                r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#,
                "does not match",
            ),
            ("PATCH", "/network-interfaces/a", r#"{"iface_id": "b"}"#, "does not match"),
            ("PUT", "/actions", r#"{"action_type": "Reboot"}"#, "unknown variant `Reboot`"),
            ("PATCH", "/vm", r#"{"state": "Stopped"}"#, "unknown variant `Stopped`"),
            ("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "/v", "vsock_id": "v"}"#, "vsock is not supported yet"),
            ("PUT", "/bulkhead/devices/block/fault", r#"{"action": "explode"}"#, "--allow-faults"),
        ];
        for (m, url, body, want) in cases {
            let r = req(&c, m, url, body);
            assert_eq!(r.status, 400, "{m} {url}");
            assert!(fault(&r).contains(want), "{m} {url}: {}", r.body);
        }
        assert!(seen.lock().expect("seen").is_empty(), "no bad request reached the VMM thread");
    }

    #[test]
    fn refusals_from_the_vmm_are_400() {
        let (c, _) = ctx(|_| Err(ActionError::WrongState("before starting the microVM")));
        let r = req(&c, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
        assert_eq!(
            (r.status, fault(&r).as_str()),
            (400, "The requested operation is not supported before starting the microVM.")
        );
    }
}
