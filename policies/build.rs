//! Compiles the JSON policies in `json/` into classic BPF with seccompiler and writes them to
//! `OUT_DIR` (`<name>.bpf`, 8 bytes per instruction, little-endian `sock_filter`), plus the
//! x86_64 syscall number→name table (`syscall_names.rs`).
//!
//! Service policies are `common.json` merged with the service's file; the core's thread policies
//! stand alone. Merging concatenates the rule lists; where a syscall is allowed without
//! conditions in either file, its conditional rules are dropped (seccompiler would otherwise keep
//! only the conditional ones, silently narrowing the unconditional permission).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// (policy name, files merged in order).
const POLICIES: &[(&str, &[&str])] = &[
    ("console", &["common.json", "console.json"]),
    ("block", &["common.json", "block.json"]),
    ("net", &["common.json", "net.json"]),
    ("vcpu", &["vcpu.json"]),
    ("core-main", &["core-main.json"]),
    ("core-api", &["core-api.json"]),
    ("core-supervisor", &["core-supervisor.json"]),
    ("core-faults", &["core-faults.json"]),
    ("no-clone3", &["no-clone3.json"]),
    ("helper", &["common.json", "console.json", "block.json", "net.json", "helper.json"]),
];

const UNISTD: &str = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
const FALLBACK_TABLE: &str = "src/syscalls_x86_64.txt";

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let json_dir = manifest.join("json");
    println!("cargo:rerun-if-changed=json");
    println!("cargo:rerun-if-changed={FALLBACK_TABLE}");
    println!("cargo:rerun-if-changed={UNISTD}");

    for (name, files) in POLICIES {
        let merged = merge(name, &files.iter().map(|f| json_dir.join(f)).collect::<Vec<_>>());
        let text = serde_json::to_string_pretty(&merged).expect("serialise merged policy");
        fs::write(out.join(format!("{name}.json")), &text).expect("write merged policy");
        let mut map = seccompiler::compile_from_json(text.as_bytes(), seccompiler::TargetArch::x86_64)
            .unwrap_or_else(|e| panic!("policy {name}: {e}"));
        let prog = map.remove(*name).unwrap_or_else(|| panic!("policy {name}: compiled map lacks it"));
        let mut bytes = Vec::with_capacity(prog.len() * 8);
        for insn in &prog {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        fs::write(out.join(format!("{name}.bpf")), bytes).expect("write bpf");
    }

    let table = match fs::read_to_string(UNISTD) {
        Ok(h) => parse_unistd(&h),
        Err(_) => None,
    }
    .unwrap_or_else(|| {
        println!("cargo:warning={UNISTD} unavailable: using the syscall list kept in {FALLBACK_TABLE}");
        parse_list(&fs::read_to_string(manifest.join(FALLBACK_TABLE)).expect("read fallback syscall list"))
    });
    let mut src = String::from(
        "/// x86_64 syscall numbers and names, sorted by number.\npub static SYSCALLS: &[(u32, &str)] = &[\n",
    );
    for (nr, name) in &table {
        src.push_str(&format!("    ({nr}, {name:?}),\n"));
    }
    src.push_str("];\n");
    fs::write(out.join("syscall_names.rs"), src).expect("write syscall table");
}

/// `#define __NR_name nr` lines; `None` if the header holds none.
fn parse_unistd(header: &str) -> Option<BTreeMap<u32, String>> {
    let map: BTreeMap<u32, String> = header
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "#define").then_some(())?;
            let name = w.next()?.strip_prefix("__NR_")?;
            Some((w.next()?.parse().ok()?, name.to_string()))
        })
        .collect();
    (!map.is_empty()).then_some(map)
}

/// `nr name` lines.
fn parse_list(list: &str) -> BTreeMap<u32, String> {
    list.lines()
        .filter_map(|l| {
            let (nr, name) = l.trim().split_once(' ')?;
            Some((nr.parse().ok()?, name.trim().to_string()))
        })
        .collect()
}

fn read_filter(path: &Path) -> Map<String, Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let Value::Object(top) = v else { panic!("{}: not a JSON object", path.display()) };
    assert_eq!(top.len(), 1, "{}: exactly one filter per file", path.display());
    let (_, filter) = top.into_iter().next().expect("one entry");
    let Value::Object(filter) = filter else { panic!("{}: the filter is not an object", path.display()) };
    filter
}

fn merge(name: &str, files: &[PathBuf]) -> Value {
    let mut rules: Vec<Value> = Vec::new();
    let mut mismatch = None;
    let mut matched = None;
    for f in files {
        let filter = read_filter(f);
        // The last file (the service's own) decides the default action.
        mismatch = filter.get("mismatch_action").cloned().or(mismatch);
        matched = filter.get("match_action").cloned().or(matched);
        let list =
            filter.get("filter").and_then(Value::as_array).unwrap_or_else(|| panic!("{}: no filter list", f.display()));
        rules.extend(list.iter().cloned());
    }
    let unconditional: BTreeSet<String> = rules
        .iter()
        .filter(|r| r.get("args").is_none())
        .filter_map(|r| r.get("syscall").and_then(Value::as_str).map(str::to_string))
        .collect();
    let mut seen_unconditional = BTreeSet::new();
    let rules: Vec<Value> = rules
        .into_iter()
        .filter(|r| {
            let sc = r.get("syscall").and_then(Value::as_str).unwrap_or_default().to_string();
            if !unconditional.contains(&sc) {
                return true;
            }
            // Keep one unconditional entry per syscall.
            r.get("args").is_none() && seen_unconditional.insert(sc)
        })
        .collect();
    json!({ name: {
        "mismatch_action": mismatch.unwrap_or_else(|| panic!("policy {name}: no mismatch_action")),
        "match_action": matched.unwrap_or_else(|| json!("allow")),
        "filter": rules,
    }})
}
