//! The Bulkhead core: owns the KVM VM, guest memory and the vCPU run loops, and forwards device
//! exits to sandboxed service processes without interpreting them.
#![deny(missing_docs)]

pub mod api;
pub mod api_client;
pub mod arch;
pub mod boot;
pub mod bus;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod devices;
pub mod faults;
pub mod helper;
pub mod host;
pub mod http;
pub mod image;
pub mod isolation;
pub mod jail;
pub mod launch;
pub mod logger;
pub mod memory;
pub mod mmio;
pub mod pidns;
pub mod service;
pub mod tap;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vmm;
