//! How anything in the core asks the VM to stop, and why it stopped.
//!
//! Devices in the core (the debug-exit port, the i8042 reset line) and the vCPU threads hold a
//! [`StopHandle`]; the main thread waits on the receiving side and tears the VM down.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote its verdict to the debug-exit port.
    DebugExit(u8),
    /// The guest reset the machine through the i8042 controller.
    I8042Reset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM reported a system event (PSCI-style shutdown or reset).
    SystemEvent(&'static str),
    /// The guest halted with no way to wake it (no in-kernel irqchip handled it).
    Halted,
    /// KVM could not continue running the guest.
    InternalError(String),
    /// The user or the host asked the VMM to stop (signal).
    Signal(i32),
    /// The operator asked for the stop (`bulkhead stop` after its grace period, `bulkhead
    /// kill`).
    Requested(String),
    /// The VM outgrew the memory limit of its cgroup: the kernel's OOM killer ended one of its
    /// processes (named here), so the VM ends as a whole.
    OutOfMemory(String),
}

impl StopReason {
    /// The process exit status this stop maps to.
    ///
    /// 0 for a guest-initiated power-off or reset and for a stop the operator asked for, the
    /// verdict byte for the debug-exit port, 70 for a KVM/guest failure, 128 + signal for a
    /// signal, 137 for a VM its memory limit ended.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::DebugExit(v) => *v,
            Self::I8042Reset | Self::TripleFault | Self::SystemEvent(_) | Self::Halted | Self::Requested(_) => 0,
            Self::InternalError(_) => 70,
            Self::Signal(s) => u8::try_from(128 + s).unwrap_or(255),
            // As a container runtime reports an OOM-killed container (128 + SIGKILL).
            Self::OutOfMemory(_) => 137,
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DebugExit(v) => write!(f, "guest wrote {v} to the debug-exit port"),
            Self::I8042Reset => write!(f, "guest requested a reset through the i8042 controller"),
            Self::TripleFault => write!(f, "guest triple-faulted (shutdown)"),
            Self::SystemEvent(e) => write!(f, "guest requested {e}"),
            Self::Halted => write!(f, "guest halted"),
            Self::InternalError(e) => write!(f, "KVM could not run the guest: {e}"),
            Self::Signal(s) => write!(f, "VMM received signal {s}"),
            Self::Requested(why) => write!(f, "{why}"),
            Self::OutOfMemory(why) => write!(f, "the VM exceeded the memory limit of its cgroup: {why}"),
        }
    }
}

/// Shared by everything that may stop the VM. Cheap to clone.
#[derive(Clone)]
pub struct StopHandle {
    stopping: Arc<AtomicBool>,
    tx: Sender<StopReason>,
}

impl fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopHandle").field("stopping", &self.is_stopping()).finish_non_exhaustive()
    }
}

impl StopHandle {
    /// A handle and the receiver the main thread waits on.
    pub fn new() -> (Self, Receiver<StopReason>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Self { stopping: Arc::new(AtomicBool::new(false)), tx }, rx)
    }

    /// Asks the VM to stop. The first reason wins; later ones are still delivered for the log.
    pub fn stop(&self, reason: StopReason) {
        self.stopping.store(true, Ordering::SeqCst);
        // The receiver lives in main until every vCPU is joined; a send after that is moot.
        let _ = self.tx.send(reason);
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_is_delivered() {
        let (h, rx) = StopHandle::new();
        assert!(!h.is_stopping());
        h.clone().stop(StopReason::DebugExit(3));
        assert!(h.is_stopping());
        assert_eq!(rx.try_recv().expect("reason"), StopReason::DebugExit(3));
        assert_eq!(StopReason::DebugExit(3).exit_code(), 3);
        assert_eq!(StopReason::I8042Reset.exit_code(), 0);
        assert_eq!(StopReason::InternalError("x".into()).exit_code(), 70);
        assert_eq!(StopReason::OutOfMemory("x".into()).exit_code(), 137);
    }
}
