//! Shared-memory exit ring and control channel between the Bulkhead core and its device services.
//!
//! The core owns the KVM VM; every device runs as a separate process. A device's port-I/O and MMIO
//! exits travel from the core to the service over an [`ring`] placed in a memfd-backed
//! [`region::SharedRegion`], with one eventfd doorbell per direction that is only rung when the
//! peer announced it is going to sleep. Set-up (which fds play which roles, the device's
//! configuration, readiness, shutdown, statistics) goes over a [`control::ControlChannel`], a Unix
//! `SOCK_SEQPACKET` socket carrying bincode-encoded [`control::ControlMsg`]s and fds.
//!
//! Both sides treat each other as hostile: every index and record read from shared memory is
//! validated and copied before use, and every wait has a deadline.
#![deny(missing_docs)]

pub mod control;
pub mod mirror;
pub mod region;
pub mod ring;
pub mod state;
pub mod wait;

pub use control::{ControlChannel, ControlError, ControlMsg};
pub use mirror::{Mirror, MirrorEntry};
pub use region::{RegionError, SharedRegion};
pub use ring::{
    CoreEndpoint, ExitKind, ExitReply, ExitRequest, IoGuard, IoMarker, IoState, IpcError, ServiceActivity,
    ServiceEndpoint, Status, WaitConfig,
};
