//! `vmm inspect DIR`: a snapshot's metadata, every checksum verified, and
//! the host-side consistency oracle run on its memory image.

use super::chain::Chain;
use crate::oracle::verify_image;
use crate::report::{error_json, EXIT_ERROR, EXIT_MISMATCH, EXIT_OK};
use crate::size::format_size;
use std::path::Path;

/// Runs `vmm inspect`; returns the exit code.
pub fn main(dir: &Path, json: bool) -> i32 {
    let fail = |kind: &str, msg: String| {
        if json {
            println!("{}", error_json(kind, &msg));
        }
        eprintln!("vmm: error: {msg}");
        EXIT_ERROR
    };
    let chain = match Chain::open(dir) {
        Ok(c) => c,
        Err(e) => return fail("bad_snapshot", e.to_string()),
    };
    let (state, crc) = (&chain.head().state, chain.head().crc);
    let m = &state.machine;
    if let Err(e) = chain.verify() {
        return fail("bad_snapshot", e.to_string());
    }
    // The oracle runs on the image the chain describes (diffs over the base).
    let oracle = verify_image(&chain);
    let id = uuid::Uuid::from_bytes(state.id).to_string();
    let mismatches = oracle.as_ref().ok().map(|v| v.total);
    if json {
        let v = serde_json::json!({
            "status": if mismatches.unwrap_or(0) > 0 { "verify_mismatch" } else { "ok" },
            "id": id,
            "mode": state.mode,
            "state_crc": format!("{crc:#010x}"),
            "vcpus": m.vcpus,
            "mem_bytes": m.mem_bytes,
            "backing": m.backing,
            "workload": m.workload,
            "pages": m.pages,
            "passes": m.passes,
            "kernel_hash": m.kernel_hash,
            "pages_stored": state.memory.pages_stored,
            "chunks": state.memory.chunk_crc.len(),
            "checksums_ok": true,
            "markers": state.markers.len(),
            "working_set": &state.working_set,
            "rom": m.regions.iter().find(|r| r.read_only).map(|r| serde_json::json!({"gpa": r.gpa, "bytes": r.size})),
            "shared_mem": m.regions.iter().find(|r| r.shared).map(|r| serde_json::json!({"gpa": r.gpa, "bytes": r.size, "file": r.file})),
            "poisoned_pages": state.markers.iter().filter(|m| m.kind == 2).map(|m| format!("{:#x}", m.gpa)).collect::<Vec<_>>(),
            "diff_parent": state.diff.as_ref().map(|d| uuid::Uuid::from_bytes(d.parent_id).to_string()),
            "diff_pages": state.diff.as_ref().map(|d| d.pages.len()),
            "chain_length": chain.links.len(),
            "verify_mismatches": mismatches,
            "oracle_error": oracle.as_ref().err().map(|e| e.to_string()),
        });
        println!("{v}");
    } else {
        println!(
            "snapshot {id} ({} mode), state.bin crc {crc:#010x}",
            state.mode
        );
        if let Some(d) = &state.diff {
            println!(
                "  diff of {} ({} pages listed), chain of {} snapshots, every link checked",
                uuid::Uuid::from_bytes(d.parent_id),
                d.pages.len(),
                chain.links.len()
            );
        }
        println!(
            "  machine: {} vCPU(s), {} ({} backing), kernel {}",
            m.vcpus,
            format_size(m.mem_bytes),
            m.backing,
            m.kernel_hash
        );
        println!(
            "  workload: {} {} pages x {} passes",
            m.workload, m.pages, m.passes
        );
        if let Some(r) = m.regions.iter().find(|r| r.read_only) {
            println!("  rom: {} at {:#x}", format_size(r.size), r.gpa);
        }
        if let Some(r) = m.regions.iter().find(|r| r.shared) {
            println!(
                "  shared memory: {} at {:#x}, the host's file {} (not in memory.bin)",
                format_size(r.size),
                r.gpa,
                r.file.as_deref().unwrap_or("?")
            );
        }
        let node_regions = m.regions.iter().filter(|r| !r.read_only && !r.shared);
        if node_regions.clone().count() > 1 || m.numa.placed {
            let nodes: Vec<String> = node_regions
                .enumerate()
                .map(|(k, r)| {
                    let vcpus: Vec<String> = (0..m.vcpus as usize)
                        .filter(|v| m.numa.vcpu_node.get(*v) == Some(&(k as u32)))
                        .map(|v| v.to_string())
                        .collect();
                    format!(
                        "node {k} {}-{} MiB, vCPUs [{}]",
                        r.gpa >> 20,
                        (r.gpa + r.size) >> 20,
                        vcpus.join(" ")
                    )
                })
                .collect();
            println!("  numa: {}", nodes.join("; "));
            if m.numa.placed {
                println!(
                    "  placed on host nodes {:?}, policy {}",
                    m.numa.host_nodes,
                    m.numa.policy.as_deref().unwrap_or("default")
                );
            }
        }
        println!(
            "  memory.bin: {} pages stored, {} chunks, every checksum verified",
            state.memory.pages_stored,
            state.memory.chunk_crc.len()
        );
        let head: Vec<String> = state
            .working_set
            .iter()
            .take(8)
            .map(|p| format!("{p:#x}"))
            .collect();
        println!(
            "  working set: {} pages in prefetch order (pages {}{})",
            state.working_set.len(),
            head.join(", "),
            if state.working_set.len() > 8 {
                ", ..."
            } else {
                ""
            }
        );
        for (i, v) in state.vcpus.iter().enumerate() {
            println!(
                "  vCPU {i}: rip={:#x} rsp={:#x} {} MSRs",
                v.regs.rip,
                v.regs.rsp,
                v.msrs.len()
            );
        }
        match &oracle {
            Ok(o) => println!("  consistency oracle: {} mismatching pages", o.total),
            Err(e) => println!("  consistency oracle: not run ({e})"),
        }
    }
    match mismatches {
        Some(n) if n > 0 => EXIT_MISMATCH,
        _ => EXIT_OK,
    }
}
