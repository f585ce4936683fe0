//! The workload loop: page steps from the shared schedule, command polling,
//! progress events and the consistency oracle.

use crate::rom::Rom;
use crate::shared::SharedMem;
use crate::{fail, io};
use core::ptr::{read_volatile, write_volatile};
use guest_protocol::boot_info::{
    BootInfo, Command, CommandOp, VcpuState, Workload, FLAG_ROUND_PER_PASS, POLL_INTERVAL,
};
use guest_protocol::control::{
    Event, BLOCK_CMD_READ, BLOCK_CMD_WRITE, ROM_CHECK_CONTENT, ROM_CHECK_CPU_REFUSED,
    ROM_CHECK_DEVICE_COPIED, ROM_CHECK_DEVICE_REFUSED, ROM_CHECK_DEVICE_TRIED,
    SHARED_CHECK_DEVICE_COPIED, SHARED_CHECK_STORED,
};
use guest_protocol::layout::{WorkArea, PAGE_SIZE};
use guest_protocol::oracle;
use guest_protocol::schedule::{word, PassSteps, ScheduleParams, Step};

/// What a poll of the command word decided.
#[derive(PartialEq, Eq)]
enum Poll {
    Continue,
    Stop,
}

struct Ctx {
    vcpu: u64,
    boot_info: *const BootInfo,
    state: *mut VcpuState,
    params: ScheduleParams,
    area: WorkArea,
    verify_at_end: bool,
    round_per_pass: bool,
    rom: Option<Rom>,
    shared: Option<SharedMem>,
}

impl Ctx {
    fn page_ptr(&self, vcpu: u64, page: u64) -> *mut u64 {
        self.area.page_gpa(vcpu, page) as *mut u64
    }

    /// The `io` workload after a page store: the block device copies the
    /// page out to this vCPU's block for it; every 8th page the block comes
    /// back into the vCPU's scratch page and must hold the word just
    /// stored. A failed request or a wrong word counts as a read mismatch.
    fn copy_out(&self, page: u64, seed: u64, pass: u64) {
        let gpa = self.area.page_gpa(self.vcpu, page);
        let block = self.vcpu * self.params.pages + page;
        let mut bad = io::block(BLOCK_CMD_WRITE, gpa / PAGE_SIZE, block) != 0;
        if page % 8 == 7 {
            let scratch = self.area.vcpu_scratch_gpa(self.vcpu);
            bad |= io::block(BLOCK_CMD_READ, scratch / PAGE_SIZE, block) != 0;
            // SAFETY: the vCPU's own scratch page, identity-mapped.
            let got = unsafe { read_volatile(scratch as *const u64) };
            bad |= got != word(seed, self.vcpu, pass, page);
        }
        if bad {
            self.state().read_mismatches += 1;
        }
    }

    fn cursor(&self) -> u64 {
        // SAFETY: the state page is this vCPU's own, identity-mapped.
        unsafe { read_volatile(&raw const (*self.state).cursor) }
    }

    fn set_cursor(&self, v: u64) {
        // SAFETY: as in `cursor`.
        unsafe { write_volatile(&raw mut (*self.state).cursor, v) }
    }

    fn add_pages_written(&self) -> u64 {
        // SAFETY: as in `cursor`.
        unsafe {
            let p = &raw mut (*self.state).pages_written;
            let n = read_volatile(p) + 1;
            write_volatile(p, n);
            n
        }
    }

    fn pages_written(&self) -> u64 {
        // SAFETY: as in `cursor`.
        unsafe { read_volatile(&raw const (*self.state).pages_written) }
    }

    fn read_mismatches(&self) -> u64 {
        // SAFETY: as in `cursor`.
        unsafe { read_volatile(&raw const (*self.state).read_mismatches) }
    }

    // The state page is guest memory reached through a raw pointer, not
    // data owned by `Ctx`.
    #[allow(clippy::mut_from_ref)]
    fn state(&self) -> &mut VcpuState {
        // SAFETY: only this vCPU touches its state page while it runs; the VMM
        // reads it only while the vCPU is paused or finished.
        unsafe { &mut *self.state }
    }

    /// Runs the oracle over this vCPU's range; read-check failures count too.
    fn verify(&self) -> u64 {
        let n = self.params.pages as usize;
        let scratch = self.area.vcpu_scratch_gpa(self.vcpu) as *mut u64;
        // SAFETY: the VMM laid out `pages` u64 of scratch for this vCPU,
        // used by nobody else.
        let expected = unsafe { core::slice::from_raw_parts_mut(scratch, n) };
        let state = *self.state();
        let m = oracle::verify_vcpu(&self.params, self.vcpu, &state, expected, |page| {
            // SAFETY: page < pages, inside this vCPU's own range.
            unsafe { read_volatile(self.page_ptr(self.vcpu, page)) }
        });
        // vCPU 0 checks the ROM too: after a restore, clone or fork it
        // must still hold what the VMM put there.
        let rom_bad = self.vcpu == 0 && self.rom.is_some_and(|r| !r.content_ok());
        m + self.read_mismatches() + rom_bad as u64
    }

    /// vCPU 0, before its first page store: probes the ROM (the block
    /// device too, in the `io` workload), reports what held, and counts
    /// each check that failed as a read mismatch.
    fn check_rom(&self, rom: &Rom) {
        let device = self.params.workload == Workload::Io;
        // Block 0 and the scratch page are free until the first page
        // store (the store copies its page out to the block over it).
        let scratch = self.area.vcpu_scratch_gpa(self.vcpu);
        let held = rom.probe(device.then_some((0, scratch)));
        let mut expected = ROM_CHECK_CONTENT | ROM_CHECK_CPU_REFUSED;
        if device {
            expected |= ROM_CHECK_DEVICE_TRIED | ROM_CHECK_DEVICE_REFUSED | ROM_CHECK_DEVICE_COPIED;
        }
        self.report_probe(Event::RomCheck, held, expected, "rom");
    }

    /// vCPU 0, before its first page store: probes the shared memory (the
    /// block device too, in the `io` workload, with block 0 as for the
    /// ROM), reports and counts as `check_rom` does.
    fn check_shared(&self, shared: &SharedMem) {
        let device = self.params.workload == Workload::Io;
        let held = shared.probe(device.then_some(0));
        let mut expected = SHARED_CHECK_STORED;
        if device {
            expected |= SHARED_CHECK_DEVICE_COPIED;
        }
        self.report_probe(Event::SharedCheck, held, expected, "shared memory");
    }

    /// Reports a probe of `what`: `event` with the bits that `held`, one
    /// line, and each `expected` bit missing as a read mismatch.
    fn report_probe(&self, event: Event, held: u64, expected: u64, what: &str) {
        let failed = (expected & !held).count_ones() as u64;
        self.state().read_mismatches += failed;
        io::event(event, held);
        io::prefix(self.vcpu);
        io::print(what);
        io::print(if failed == 0 {
            ": ok\n"
        } else {
            ": CHECK FAILED\n"
        });
    }

    fn report_verify(&self) {
        if self.vcpu == 0 {
            if let Some(w) = self.shared.and_then(|s| s.third_page_word()) {
                io::event(Event::SharedSeen, w);
            }
        }
        let m = self.verify();
        io::prefix(self.vcpu);
        io::print("verify: ");
        io::print_u64(m);
        io::print(" mismatches\n");
        io::event(Event::VerifyResult, m);
    }

    fn command(&self) -> (u32, u32, u64) {
        // SAFETY: the boot-info page is identity-mapped and vcpu < MAX_VCPUS;
        // the word is read before the argument, which the VMM writes first.
        unsafe {
            let slot = &raw const (*self.boot_info).commands[self.vcpu as usize];
            let w = read_volatile(&raw const (*slot).word);
            let arg = read_volatile(&raw const (*slot).arg);
            let (seq, op) = Command::unpack(w);
            (seq, op, arg)
        }
    }

    /// The round doorbell: report `RoundEnd`, then wait until the command
    /// word changes from `seq` (the VMM has harvested); the caller's poll
    /// loop acts on the new command.
    fn wait_at_doorbell(&self, seq: u32) {
        io::event(Event::RoundEnd, self.pages_written());
        while self.command().0 == seq {
            io::idle();
        }
    }

    /// A round end at a pass boundary (`FLAG_ROUND_PER_PASS`): wait at the
    /// doorbell, then act on the command that released it.
    fn round_end(&self) -> Poll {
        // Take any command still pending first, so the doorbell waits for
        // the VMM's answer to this round, not for something sent earlier.
        if self.poll() == Poll::Stop {
            return Poll::Stop;
        }
        let (seq, _, _) = self.command();
        self.wait_at_doorbell(seq);
        self.poll()
    }

    /// Acts on every new command in the command word.
    fn poll(&self) -> Poll {
        loop {
            let (seq, op, arg) = self.command();
            if seq as u64 == self.state().last_command_seq {
                return Poll::Continue;
            }
            self.state().last_command_seq = seq as u64;
            io::event(Event::CommandAck, seq as u64);
            match CommandOp::from_u32(op) {
                Some(CommandOp::Continue) => {}
                Some(CommandOp::Verify) => self.report_verify(),
                Some(CommandOp::Stop) => return Poll::Stop,
                Some(CommandOp::EndRound) => self.wait_at_doorbell(seq),
                Some(CommandOp::SetSeed) => {
                    if !self.state().push_seed(arg, self.params.pages) {
                        fail(self.vcpu, "seed history full");
                    }
                }
                Some(CommandOp::Forked) => {
                    io::prefix(self.vcpu);
                    io::print("forked: a child, seed ");
                    io::print_u64(arg);
                    io::print(" from the next pass\n");
                    if !self.state().push_seed(arg, self.params.pages) {
                        fail(self.vcpu, "seed history full");
                    }
                }
                None => fail(self.vcpu, "unknown command op"),
            }
        }
    }
}

/// The boot-info page's header: what a vCPU needs of it to run.
struct BootHeader {
    state_gpa: u64,
    verify_at_end: u32,
    flags: u32,
    params: Option<ScheduleParams>,
}

impl BootHeader {
    /// # Safety
    /// `bi` is the identity-mapped boot-info page.
    unsafe fn read(bi: *const BootInfo) -> BootHeader {
        // SAFETY: the caller's contract; each field is read on its own.
        unsafe {
            let workload = read_volatile(&raw const (*bi).workload);
            BootHeader {
                state_gpa: read_volatile(&raw const (*bi).state_gpa),
                verify_at_end: read_volatile(&raw const (*bi).verify_at_end),
                flags: read_volatile(&raw const (*bi).flags),
                params: Workload::from_u32(workload).map(|w| BootInfo::read_schedule(bi, w)),
            }
        }
    }
}

/// Runs the workload the boot-info page names on vCPU `vcpu`; never returns.
pub fn run(vcpu: u64, boot_info: *const BootInfo) -> ! {
    // SAFETY: identity-mapped boot-info page; its header does not change
    // after boot. Only the header is copied (the command slots are read
    // volatile when polled): every copied word is an emulated instruction.
    let bi = unsafe { BootHeader::read(boot_info) };
    let Some(params) = bi.params else {
        fail(vcpu, "boot info: unknown workload");
    };
    let workload = params.workload;
    if vcpu >= params.vcpus || params.pages == 0 && workload != Workload::Idle {
        fail(vcpu, "boot info: bad vCPU count or page count");
    }
    if params.numa.check(params.vcpus).is_err() {
        fail(vcpu, "boot info: bad NUMA layout");
    }
    let ctx = Ctx {
        vcpu,
        boot_info,
        state: (bi.state_gpa + vcpu * PAGE_SIZE) as *mut VcpuState,
        params,
        area: params.work_area(),
        verify_at_end: bi.verify_at_end != 0,
        round_per_pass: bi.flags & FLAG_ROUND_PER_PASS != 0,
        // SAFETY: as for the header.
        rom: unsafe { Rom::of(boot_info) },
        // SAFETY: as for the header.
        shared: unsafe { SharedMem::of(boot_info) },
    };
    io::prefix(vcpu);
    io::print("booted, workload ");
    io::print(workload.name());
    io::print(", ");
    io::print_u64(params.pages);
    io::print(" pages x ");
    io::print_u64(params.passes);
    io::print(" passes");
    if params.numa.nodes > 1 {
        io::print(", on NUMA node ");
        io::print_u64(params.numa.node_of_vcpu(vcpu) as u64);
    }
    io::print("\n");
    if vcpu == 0 && params.numa.nodes > 1 {
        print_topology(&params);
    }
    if let Some(rom) = ctx.rom.filter(|_| vcpu == 0) {
        ctx.check_rom(&rom);
    }
    if let Some(shared) = ctx.shared.filter(|_| vcpu == 0) {
        ctx.check_shared(&shared);
    }

    if workload == Workload::Idle {
        io::event(Event::Waiting, 0);
        while ctx.poll() == Poll::Continue {
            io::idle();
        }
    } else {
        run_steps(&ctx);
    }
    if ctx.verify_at_end {
        ctx.report_verify();
    }
    io::prefix(vcpu);
    io::print("done, ");
    io::print_u64(ctx.pages_written());
    io::print(" page stores\n");
    io::event(Event::Done, ctx.pages_written());
    io::halt()
}

/// What the guest learnt of its NUMA topology: one line per node.
fn print_topology(params: &ScheduleParams) {
    for node in 0..params.numa.nodes {
        let r = params.numa.ranges[node as usize];
        io::prefix(0);
        io::print("numa: node ");
        io::print_u64(node as u64);
        io::print(" memory ");
        io::print_u64(r.gpa >> 20);
        io::print("-");
        io::print_u64(r.end() >> 20);
        io::print(" MiB, vCPUs");
        for v in 0..params.vcpus {
            if params.numa.node_of_vcpu(v) == node {
                io::print(" ");
                io::print_u64(v);
            }
        }
        io::print("\n");
    }
}

fn run_steps(ctx: &Ctx) {
    let params = &ctx.params;
    let total = params.total_steps();
    let mut current: Option<(u64, PassSteps)> = None;
    loop {
        let cursor = ctx.cursor();
        if cursor.is_multiple_of(POLL_INTERVAL) || cursor >= total {
            io::event(Event::Progress, ctx.pages_written());
            if ctx.poll() == Poll::Stop || cursor >= total {
                return;
            }
        }
        let pass = cursor / params.pages;
        let index = cursor % params.pages;
        let seed = ctx.state().seed_for_pass(pass);
        let steps = match &mut current {
            Some((p, steps)) if *p == pass => steps,
            _ => {
                let mut steps = PassSteps::new(&ctx.params, ctx.vcpu, pass, seed);
                steps.skip_to(index);
                &mut current.insert((pass, steps)).1
            }
        };
        match steps.step() {
            Step::Write { page } => {
                // SAFETY: page < pages: inside this vCPU's own range.
                unsafe {
                    write_volatile(
                        ctx.page_ptr(ctx.vcpu, page),
                        word(seed, ctx.vcpu, pass, page),
                    )
                };
                ctx.add_pages_written();
                if params.workload == Workload::Io {
                    ctx.copy_out(page, seed, pass);
                }
            }
            Step::Read {
                vcpu,
                page,
                expect_from_pass0,
            } => {
                // SAFETY: vcpu < vcpus and page < pages: inside the work area.
                let got = unsafe { read_volatile(ctx.page_ptr(vcpu, page)) };
                if expect_from_pass0 && got != word(ctx.state().seed_for_pass(0), vcpu, 0, page) {
                    let s = ctx.state();
                    s.read_mismatches += 1;
                }
            }
            Step::Nothing => {}
        }
        ctx.set_cursor(cursor + 1);
        if (cursor + 1).is_multiple_of(params.pages) {
            io::event(Event::PassDone, pass);
            if ctx.round_per_pass && ctx.round_end() == Poll::Stop {
                return;
            }
        }
    }
}
