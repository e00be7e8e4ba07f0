//! What kind of KVM the host has, and what the guest needs because of it.
//!
//! On PVM (a pagetable-based KVM without VMX/SVM), an unmodified Linux guest runs mostly in KVM's
//! instruction emulator, which lacks XSAVE/XRSTOR, CLAC/STAC and POPCNT; and the guest sees the
//! host's CPUID whatever KVM_SET_CPUID2 says. So the features have to be turned off with kernel
//! parameters. On hardware-assisted KVM nothing is added.

use std::path::Path;

/// The host's KVM flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// Hardware-assisted KVM (VMX or SVM).
    Hardware,
    /// PVM: shadow paging, no hardware virtualisation.
    Pvm,
}

/// Kernel parameters a stock Linux guest needs under PVM.
pub const PVM_KERNEL_PARAMS: &[&str] = &["noxsave", "nosmap", "clearcpuid=popcnt,smap,xsave"];

impl HostKvm {
    /// Detects the flavour from sysfs (`/sys/module/kvm_pvm` exists when the PVM module is loaded).
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detection against a given sysfs module directory (for tests).
    pub fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            Self::Pvm
        } else {
            Self::Hardware
        }
    }

    /// The parameters to add to `cmdline` on this host: those of [`PVM_KERNEL_PARAMS`] whose key
    /// the user did not already set.
    pub fn extra_kernel_params(self, cmdline: &str) -> Vec<String> {
        if self == Self::Hardware {
            return Vec::new();
        }
        let key = |w: &str| w.split('=').next().unwrap_or(w).to_string();
        let present: Vec<String> = cmdline.split_whitespace().map(key).collect();
        PVM_KERNEL_PARAMS.iter().filter(|p| !present.contains(&key(p))).map(|p| (*p).to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_adds_nothing() {
        assert!(HostKvm::Hardware.extra_kernel_params("console=ttyS0").is_empty());
    }

    #[test]
    fn pvm_adds_missing_params_only() {
        let extra = HostKvm::Pvm.extra_kernel_params("console=ttyS0 nosmap clearcpuid=popcnt");
        assert_eq!(extra, vec!["noxsave".to_string()]);
        assert_eq!(HostKvm::Pvm.extra_kernel_params("").len(), 3);
    }

    #[test]
    fn detection_follows_sysfs() {
        let dir = std::env::temp_dir().join(format!("bulkhead-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(HostKvm::detect_in(&dir), HostKvm::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm")).expect("mkdir");
        assert_eq!(HostKvm::detect_in(&dir), HostKvm::Pvm);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
