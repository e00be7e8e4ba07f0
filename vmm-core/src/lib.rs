//! The Bulkhead core: owns the KVM VM, guest memory and the vCPU run loops, and forwards device
//! exits to sandboxed service processes without interpreting them.
#![deny(missing_docs)]

pub mod bus;
