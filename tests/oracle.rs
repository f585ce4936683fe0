//! The consistency oracle can fail: a page corrupted from the host while the
//! guest is paused is reported as exactly one mismatch, by the guest's own
//! verify and by the host-side check. Commands sent through the command word
//! (verify now, new seed from the next pass) keep the oracle exact.

use guest_protocol::boot_info::PageStruct;
use guest_protocol::layout::{state_gpa, WorkArea};
use guest_protocol::{CommandOp, VcpuState, Workload};
use vmm::config::VmConfig;
use vmm::report::{RunStatus, EXIT_MISMATCH};
use vmm::runner::{run, HookError, RunHooks, SerialSink, VmHandle};

fn config(workload: Workload, vcpus: u32) -> VmConfig {
    VmConfig {
        mem_bytes: 64 << 20,
        vcpus,
        workload,
        pages: 256,
        passes: 1,
        seed: 3,
        ..VmConfig::default()
    }
}

#[test]
fn a_corrupted_page_is_exactly_one_mismatch() {
    for (workload, vcpus) in [
        (Workload::SeqWrite, 1),
        (Workload::SeqWrite, 2),
        (Workload::RandWrite, 2),
    ] {
        let cfg = config(workload, vcpus);
        let area = cfg.work_area();
        let hooks = RunHooks::default().after_pages(
            128,
            Box::new(move |vm: &mut VmHandle| -> Result<(), HookError> {
                vm.pause()?;
                // Flip a bit in the first written page of vCPU 0's range; a
                // single pass never writes a page twice in seq-write, and for
                // rand-write the flipped word can only match by accident.
                let page = (0..area.pages_per_vcpu)
                    .find(|p| vm.ram().load_u64(area.page_gpa(0, *p)).unwrap_or(0) != 0)
                    .ok_or_else(|| HookError("no written page yet".into()))?;
                let gpa = area.page_gpa(0, page);
                let word = vm.ram().load_u64(gpa)?;
                vm.ram().store_u64(gpa, word ^ (1 << 5))?;
                vm.resume();
                Ok(())
            }),
        );
        let report = run(&cfg, hooks, SerialSink::Capture).expect("run");
        // rand-write may overwrite the corrupted page later in the pass;
        // seq-write never does.
        if workload == Workload::SeqWrite {
            assert_eq!(
                report.verify_mismatches,
                Some(1),
                "{workload:?} x{vcpus}: {:?}",
                report.serial
            );
            assert_eq!(report.host_verify_mismatches, Some(1));
            assert_eq!(report.status, RunStatus::VerifyMismatch);
            assert_eq!(report.exit_code(), EXIT_MISMATCH);
        } else {
            assert!(report.verify_mismatches.unwrap_or(9) <= 1);
            assert_eq!(report.verify_mismatches, report.host_verify_mismatches);
        }
    }
}

#[test]
fn verify_and_seed_commands_mid_run_keep_the_oracle_exact() {
    for workload in [Workload::SeqWrite, Workload::RandWrite, Workload::Mixed] {
        let mut cfg = config(workload, 2);
        cfg.passes = 3;
        cfg.pages = 128;
        let hooks = RunHooks::default()
            .after_pages(
                1,
                Box::new(|vm: &mut VmHandle| -> Result<(), HookError> {
                    // Each command waits until the guest took the previous one.
                    vm.send_command(0, CommandOp::SetSeed, 77)?;
                    vm.send_command(1, CommandOp::SetSeed, 99)?;
                    vm.broadcast(CommandOp::Verify, 0)?;
                    Ok(())
                }),
            )
            .at_exit(Box::new(|vm: &mut VmHandle| -> Result<(), HookError> {
                // The guest recorded the new seeds in its seed history.
                for (v, seed) in [(0u64, 77u64), (1, 99)] {
                    let mut buf = vec![0u8; std::mem::size_of::<VcpuState>()];
                    vm.ram().read(state_gpa(v), &mut buf)?;
                    let st =
                        VcpuState::from_bytes(&buf).ok_or_else(|| HookError("short".into()))?;
                    // From the first pass not started when the command came
                    // (pass 0 itself for a vCPU that had not begun).
                    if st.seed_for_pass(2) != seed {
                        return Err(HookError(format!(
                            "vCPU {v}: seed history {:?}",
                            &st.seeds[..2]
                        )));
                    }
                }
                Ok(())
            }));
        let report = run(&cfg, hooks, SerialSink::Capture).expect("run");
        assert_eq!(
            report.status,
            RunStatus::Ok,
            "{workload:?}: {:?} {:?}",
            report.error,
            report.serial
        );
        assert_eq!(report.host_verify_mismatches, Some(0));
        // Two verify results per vCPU: the one asked for mid-run and the final one.
        let verifies = report
            .serial
            .iter()
            .filter(|l| l.contains("verify: 0 mismatches"))
            .count();
        assert_eq!(verifies, 4, "{workload:?}: {:?}", report.serial);
    }
}

#[test]
fn a_stale_page_is_caught_by_the_host_oracle() {
    // Put back an older pass's word (what a lost write looks like) in a
    // seq-write guest after it finished its first pass.
    let mut cfg = config(Workload::SeqWrite, 1);
    cfg.passes = 2;
    let area: WorkArea = cfg.work_area();
    let hooks = RunHooks::default().after_pages(
        300,
        Box::new(move |vm: &mut VmHandle| -> Result<(), HookError> {
            vm.pause()?;
            // Page 1 was rewritten in pass 1 by now (300 > 256 + 1).
            let stale = guest_protocol::schedule::word(3, 0, 0, 1);
            vm.ram().store_u64(area.page_gpa(0, 1), stale)?;
            vm.resume();
            Ok(())
        }),
    );
    let report = run(&cfg, hooks, SerialSink::Capture).expect("run");
    assert_eq!(report.host_verify_mismatches, Some(1));
    assert_eq!(report.verify_mismatches, Some(1));
}
