//! `GET /bulkhead/isolation` and `bulkhead inspect`: what confines each process of a running VM,
//! as the kernel reports it. Real processes, sandbox on.

use std::time::Duration;

use bulkhead_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn process<'a>(report: &'a Value, role: &str) -> &'a Value {
    report["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["role"] == role))
        .unwrap_or_else(|| panic!("no process {role} in {report}"))
}

#[test]
fn inspect_reads_back_what_confines_every_process() {
    let dir = scratch("isolation");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).expect("create").set_len(4 << 20).expect("size");
    let serial = dir.join("serial.log");
    let sock = dir.join("api.sock");
    let cmdline = "probe.test=ticker probe.n=1000000 probe.delay=20000";
    let extra = ["--api-sock", sock.to_str().expect("utf8")];
    let child = VmChild::spawn(&mut bulkhead(&probe_vm_args(&serial, Some(&disk), cmdline, &extra)));
    assert!(wait_for_serial(&serial, "tick 1\n", LIMIT), "guest never ticked");
    let (s, body) = curl(&sock, "GET", "/bulkhead/isolation", None);
    assert_eq!(s, 200, "{body}");
    let report: Value = serde_json::from_str(&body).expect("json");

    // The core: its pid, and its threads as the kernel sees them. The vCPU thread runs under its
    // seccomp filter; the VMM thread (the main one) under its own once the VM started.
    let core = process(&report, "core");
    assert_eq!(core["pid"].as_u64(), Some(u64::from(core_of(child.id()))), "{core}");
    let threads = core["threads"].as_array().expect("threads");
    let thread = |name: &str| threads.iter().find(|t| t["status"]["name"] == name).cloned();
    let vcpu = thread("vcpu0").unwrap_or_else(|| panic!("no vcpu0 thread: {core}"));
    assert_eq!(vcpu["status"]["seccomp"], "filter", "{vcpu}");
    assert_eq!(core["status"]["seccomp"], "filter", "the VMM thread is filtered: {core}");
    assert!(
        core["fds"].as_array().expect("fds").iter().any(|f| f["kind"] == "kvm-vm"),
        "the core holds the VM: {core}"
    );

    // Every service: no capability, not root, no_new_privs, a seccomp filter, namespaces and a
    // root directory of its own, a bounded heap, and only the fds it needs.
    for role in ["console", "block-disk0"] {
        let p = process(&report, role);
        let st = &p["status"];
        assert_ne!(st["uid"][1], 0, "{role}: {p}");
        assert_ne!(st["gid"][1], 0, "{role}: {p}");
        for set in ["cap_effective", "cap_permitted", "cap_inheritable", "cap_ambient", "cap_bounding"] {
            assert_eq!(st[set], "0000000000000000", "{role} {set}: {p}");
        }
        assert_eq!(st["no_new_privs"], true, "{role}: {p}");
        assert_eq!(st["seccomp"], "filter", "{role}: {p}");
        for ns in ["mnt", "pid", "net", "ipc", "uts", "user"] {
            assert_eq!(p["namespaces"][ns]["host"], false, "{role} {ns}: {p}");
        }
        assert_eq!(p["root"]["host"], false, "{role}: {p}");
        assert_eq!(p["rlimits"]["Max data size"]["soft"], 16 << 20, "{role}: {p}");
        let fds = p["fds"].as_array().expect("fds");
        assert_eq!(p["fd_count"].as_u64(), Some(fds.len() as u64), "{role}: {p}");
        let kinds: Vec<&str> = fds.iter().filter_map(|f| f["kind"].as_str()).collect();
        assert!(kinds.contains(&"memfd") && kinds.contains(&"eventfd"), "{role}: ring and doorbells: {kinds:?}");
        assert!(!kinds.contains(&"kvm-vm") && !kinds.contains(&"kvm-vcpu"), "{role} holds no KVM fd: {kinds:?}");
        assert!(p["errors"].as_array().is_some_and(Vec::is_empty), "{role}: {p}");
    }
    let block = process(&report, "block-disk0");
    let disk_path = disk.canonicalize().expect("canonical").to_string_lossy().into_owned();
    assert!(
        block["fds"].as_array().expect("fds").iter().any(|f| f["target"] == disk_path.as_str()),
        "the block service holds its image: {block}"
    );

    // The command-line client prints the same, as text.
    let out = bulkhead_cli(&["inspect", sock.to_str().expect("utf8")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("core (pid ") && text.contains("block-disk0 (pid "), "{text}");
    assert!(text.contains("no_new_privs: true, seccomp: filter"), "{text}");
    let (s, b) = curl(&sock, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#));
    assert_eq!(s, 204, "{b}");
    let r = child.finish(LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}
