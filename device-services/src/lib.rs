//! Bulkhead device services: the runtime every service process shares, and the devices.
//!
//! A service is started by the core with one inherited fd, its end of the control socket
//! (`--control-fd N`, default 3). [`runtime::Startup::from_args`] receives the set-up message and
//! the fds it names, maps the exit ring; the service then builds its device, enters its jail
//! ([`jail`]) keeping only the fds it needs, and [`runtime::Startup::serve`] answers exit records
//! with a [`runtime::PioHandler`] while watching the control socket and the device's own fds.
#![deny(missing_docs)]

pub mod console;
pub mod footprint;
pub mod jail;
pub mod mains;
pub mod memory;
pub mod output;
pub mod ratelimit;
pub mod runtime;
pub mod virtio;

pub use runtime::{MmioHandler, PioHandler, RuntimeError, Startup};
