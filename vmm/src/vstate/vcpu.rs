//! A vCPU thread: runs `KVM_RUN`, decodes the serial and control ports, and
//! reports to the supervisor's event loop through a channel.

use crate::devices::control_port::{ControlLatch, ControlWrite};
use crate::devices::serial::{LineAssembler, LSR_IDLE};
use crate::dirty::RingFullHandler;
use crate::snapshot::state::save_vcpu;
use crate::vstate::boot::describe_registers;
use crate::vstate::capture::CaptureSlots;
use crate::vstate::control::VcpuControl;
use guest_mem::GuestRam;
use guest_protocol::control::{Event, IDLE_PORT, SERIAL_LSR_PORT, SERIAL_PORT};
use kvm_bindings::kvm_cpuid_entry2;
use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// A message from a vCPU thread to the supervisor.
#[derive(Debug)]
pub enum VcpuMsg {
    /// A complete line of serial output.
    Serial {
        /// Which vCPU wrote it.
        vcpu: u32,
        /// The line, without its newline.
        line: String,
    },
    /// A control-port event.
    Event {
        /// Which vCPU sent it.
        vcpu: u32,
        /// The event.
        event: Event,
        /// Its argument.
        arg: u64,
    },
    /// The thread left its run loop.
    Exited {
        /// Which vCPU.
        vcpu: u32,
        /// Why.
        outcome: VcpuOutcome,
    },
}

/// Why a vCPU stopped running.
#[derive(Debug)]
pub enum VcpuOutcome {
    /// The guest reported `Done`.
    Done,
    /// The guest executed `hlt` (kernels that do not speak the protocol).
    Halted,
    /// The supervisor stopped it.
    Stopped,
    /// The guest reported a panic.
    Panicked,
    /// The vCPU failed.
    Fault(VcpuFault),
}

/// A vCPU failure, with the registers where that helps.
#[derive(Debug, thiserror::Error)]
pub enum VcpuFault {
    /// Triple fault: KVM reported a shutdown.
    #[error("vCPU {vcpu}: triple fault (guest shutdown); {regs}")]
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Register dump.
        regs: String,
    },
    /// KVM could not emulate an instruction.
    #[error("vCPU {vcpu}: KVM internal error (suberror {suberror}): the instruction could not be run; {regs}")]
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// KVM's sub-error code.
        suberror: u32,
        /// Register dump.
        regs: String,
    },
    /// VM entry failed.
    #[error("vCPU {vcpu}: VM entry failed (hardware reason {reason:#x}); {regs}")]
    FailEntry {
        /// The vCPU.
        vcpu: u32,
        /// Hardware entry failure reason.
        reason: u64,
        /// Register dump.
        regs: String,
    },
    /// The guest touched guest-physical memory that is not RAM.
    #[error(
        "vCPU {vcpu}: guest accessed guest-physical address {addr:#x}, which is not RAM; {regs}"
    )]
    Unmapped {
        /// The vCPU.
        vcpu: u32,
        /// The address.
        addr: u64,
        /// Register dump.
        regs: String,
    },
    /// The guest touched a poisoned page (a memory error).
    #[error("vCPU {vcpu}: memory error: guest-physical address {addr:#x} is poisoned; {regs}")]
    MemoryError {
        /// The vCPU.
        vcpu: u32,
        /// The address.
        addr: u64,
        /// Register dump.
        regs: String,
    },
    /// The guest broke the control-port protocol.
    #[error("vCPU {vcpu}: guest protocol error: {what}")]
    Protocol {
        /// The vCPU.
        vcpu: u32,
        /// What was wrong.
        what: String,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected VM exit {what}; {regs}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u32,
        /// The exit.
        what: String,
        /// Register dump.
        regs: String,
    },
    /// `KVM_RUN` itself failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {source}")]
    Run {
        /// The vCPU.
        vcpu: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

/// Sends messages to the supervisor and wakes its event loop.
#[derive(Clone)]
pub struct MsgSender {
    tx: mpsc::Sender<VcpuMsg>,
    wake: Arc<EventFd>,
}

impl MsgSender {
    /// A sender that signals `wake` after each message.
    pub fn new(tx: mpsc::Sender<VcpuMsg>, wake: Arc<EventFd>) -> MsgSender {
        MsgSender { tx, wake }
    }

    /// Sends a message (dropped if the supervisor is gone).
    pub fn send(&self, msg: VcpuMsg) {
        if self.tx.send(msg).is_ok() {
            // A full eventfd counter still wakes the loop; nothing to do on error.
            let _ = self.wake.write(1);
        }
    }
}

/// What the run loop does after an exit.
enum Next {
    Run,
    Exit(VcpuOutcome),
    Fault(fn(u32, String) -> VcpuFault),
    /// An MMIO exit at this address that is not guest RAM's lazy slot, or
    /// that slot could not be added (why).
    Mmio(u64, Option<String>),
}

/// One vCPU and its device state, run on its own thread.
pub struct VcpuRunner {
    index: u32,
    fd: VcpuFd,
    control: Arc<VcpuControl>,
    tx: MsgSender,
    first_io: Arc<OnceLock<Instant>>,
    first_run: Option<Arc<OnceLock<Instant>>>,
    serial: LineAssembler,
    latch: ControlLatch,
    ram: Arc<GuestRam>,
    ring_full: Option<Arc<dyn RingFullHandler>>,
    capture: Option<(Arc<CaptureSlots>, Vec<kvm_cpuid_entry2>)>,
    block: Option<Arc<crate::devices::block::BlockDevice>>,
    rom: Option<Arc<crate::devices::rom::RomGuard>>,
    lazy_slot: Option<Arc<crate::vstate::vm::LazySlot>>,
    start_gate: Option<Arc<crate::vstate::start_gate::StartGate>>,
    /// Started behind this gate, it has not answered there yet (see
    /// [`VcpuRunner::with_start_gate`]).
    answer_at: Option<Arc<crate::vstate::start_gate::StartGate>>,
}

impl VcpuRunner {
    /// A runner for vCPU `index`; `first_io` records the VM's first I/O exit;
    /// `ram` attributes this thread's memory faults to the vCPU.
    pub fn new(
        index: u32,
        fd: VcpuFd,
        control: Arc<VcpuControl>,
        tx: MsgSender,
        first_io: Arc<OnceLock<Instant>>,
        ram: Arc<GuestRam>,
    ) -> VcpuRunner {
        VcpuRunner {
            index,
            fd,
            control,
            tx,
            first_io,
            first_run: None,
            serial: LineAssembler::default(),
            latch: ControlLatch::default(),
            ram,
            ring_full: None,
            capture: None,
            block: None,
            rom: None,
            lazy_slot: None,
            start_gate: None,
            answer_at: None,
        }
    }

    /// Waits at `gate` before the first `KVM_RUN`; a cancelled gate stops
    /// the vCPU without running it. A vCPU started behind a gate (one of a
    /// set of VMs released together) waits there again after its first
    /// I/O exit, off the CPU, until every member of the set has made its
    /// own (or none has for [`FIRST_ANSWER_WAIT`]): on a host with fewer
    /// CPUs than the set has vCPUs, every member answers once before any
    /// goes on with its work (it used to yield its CPU once instead: see
    /// docs/benchmarks.md).
    pub fn with_start_gate(
        mut self,
        gate: Option<Arc<crate::vstate::start_gate::StartGate>>,
    ) -> Self {
        self.answer_at = gate.clone();
        self.start_gate = gate;
        self
    }

    fn answer_after_first_io(&mut self) {
        if let Some(gate) = self.answer_at.take() {
            gate.answered(FIRST_ANSWER_WAIT);
        }
    }

    /// Adds the lazy memory slot when the guest first touches its memory.
    pub fn with_lazy_slot(mut self, slot: Option<Arc<crate::vstate::vm::LazySlot>>) -> Self {
        self.lazy_slot = slot;
        self
    }

    /// Serves the block device's ports on this vCPU.
    pub fn with_block(mut self, block: Option<Arc<crate::devices::block::BlockDevice>>) -> Self {
        self.block = block;
        self
    }

    /// Starts from the port registers a restored vCPU had (its control
    /// latch, and its block device registers when the VM has the device).
    pub fn with_ports(mut self, ports: crate::snapshot::state::PortRegs) -> Self {
        self.latch = crate::devices::control_port::ControlLatch::holding(ports.control_arg);
        if let (Some(b), Some(regs)) = (&self.block, ports.block) {
            b.set_regs_of(self.index, regs);
        }
        self
    }

    /// Refuses the guest's writes to its ROM and serves the ROM's port.
    pub fn with_rom(mut self, rom: Option<Arc<crate::devices::rom::RomGuard>>) -> Self {
        self.rom = rom;
        self
    }

    /// Records in `first_run` when the first vCPU enters `KVM_RUN` (the
    /// end of the VMM's part of a start: what follows is guest time).
    pub fn with_first_run(mut self, first_run: Arc<OnceLock<Instant>>) -> VcpuRunner {
        self.first_run = Some(first_run);
        self
    }

    /// Saves this vCPU's state into `slots` when a capture is requested
    /// (`cpuid` is recorded with it).
    pub fn with_capture(mut self, slots: Arc<CaptureSlots>, cpuid: Vec<kvm_cpuid_entry2>) -> Self {
        self.capture = Some((slots, cpuid));
        self
    }

    /// Drains this vCPU's dirty ring through `handler` when KVM reports it full.
    pub fn with_ring_full_handler(mut self, handler: Option<Arc<dyn RingFullHandler>>) -> Self {
        self.ring_full = handler;
        self
    }

    /// Runs until the guest is done, fails, or the supervisor stops it.
    pub fn run(mut self) {
        // Faults this thread takes are attributed to this vCPU.
        self.ram.register_vcpu_thread(self.index);
        let outcome = self.run_loop();
        if !self.serial.is_empty() {
            let line = self.serial.take();
            self.tx.send(VcpuMsg::Serial {
                vcpu: self.index,
                line,
            });
        }
        self.control.exited();
        self.tx.send(VcpuMsg::Exited {
            vcpu: self.index,
            outcome,
        });
    }

    fn run_loop(&mut self) -> VcpuOutcome {
        if let Some(gate) = self.start_gate.take() {
            if !gate.wait() {
                return VcpuOutcome::Stopped;
            }
        }
        let vcpu = self.index;
        let control = self.control.clone();
        // The last exit was port I/O or MMIO, which KVM completes only on
        // the next KVM_RUN (an `in` or MMIO read loads its data then, and
        // an `out` on KVM's fast PIO path steps past the instruction then):
        // a state saved before would stand on the instruction, and a guest
        // restored or forked from it would run the I/O again.
        let mut io_pending = false;
        loop {
            let completing = io_pending && control.pause_requested();
            if completing {
                // Complete it before the vCPU parks for a capture: one
                // KVM_RUN that returns at once, running no guest code
                // (KVM's `immediate_exit`).
                self.fd.set_kvm_immediate_exit(1);
            } else {
                let (fd, capture, latch, block) =
                    (&self.fd, &self.capture, &self.latch, &self.block);
                let mut before_park = || {
                    if let Some((slots, cpuid)) = capture {
                        if let Some(epoch) = slots.pending(vcpu) {
                            let ports = crate::snapshot::state::PortRegs {
                                control_arg: latch.arg(),
                                block: block.as_ref().and_then(|b| b.regs_of(vcpu)),
                            };
                            let state = save_vcpu(fd, cpuid)
                                .map(|s| crate::snapshot::state::SavedVcpu { ports, ..s })
                                .map_err(|e| e.to_string());
                            slots.store(vcpu, epoch, state);
                        }
                    }
                };
                if !control.checkpoint_with(&mut before_park) {
                    log::debug!("vCPU {vcpu} stopped at {}", describe_registers(&self.fd));
                    return VcpuOutcome::Stopped;
                }
                if let Some(t) = &self.first_run {
                    t.get_or_init(Instant::now);
                }
            }
            let result = self.fd.run();
            io_pending = matches!(
                result,
                Ok(VcpuExit::IoOut(..)
                    | VcpuExit::IoIn(..)
                    | VcpuExit::MmioRead(..)
                    | VcpuExit::MmioWrite(..))
            );
            let next = match result {
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.first_io.get_or_init(Instant::now);
                    let data = data.to_vec();
                    let next = self.io_out(port, &data);
                    self.answer_after_first_io();
                    next
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.first_io.get_or_init(Instant::now);
                    let block = self
                        .block
                        .as_ref()
                        .filter(|_| crate::devices::block::BlockDevice::claims(port));
                    let rom = self
                        .rom
                        .as_ref()
                        .filter(|_| crate::devices::rom::RomGuard::claims(port));
                    if let Some(r) = rom {
                        let count = r.io_in().to_le_bytes();
                        for (d, c) in data.iter_mut().zip(count) {
                            *d = c;
                        }
                    } else {
                        let fill = if let Some(b) = block {
                            b.io_in(vcpu, port)
                        } else if port == SERIAL_LSR_PORT {
                            LSR_IDLE
                        } else {
                            0xff
                        };
                        data.fill(fill);
                    }
                    self.answer_after_first_io();
                    Next::Run
                }
                Ok(VcpuExit::Hlt) => Next::Exit(VcpuOutcome::Halted),
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match &self.ring_full {
                    Some(h) => match h.ring_full(vcpu) {
                        Ok(()) => Next::Run,
                        Err(e) => {
                            return VcpuOutcome::Fault(VcpuFault::UnexpectedExit {
                                vcpu,
                                what: format!("dirty ring full, and draining it failed: {e}"),
                                regs: String::new(),
                            })
                        }
                    },
                    None => {
                        let regs = describe_registers(&self.fd);
                        return VcpuOutcome::Fault(VcpuFault::UnexpectedExit {
                            vcpu,
                            what: "dirty ring full without a ring tracker".into(),
                            regs,
                        });
                    }
                },
                Ok(VcpuExit::Intr) => Next::Run,
                Ok(VcpuExit::Shutdown) => {
                    Next::Fault(|vcpu, regs| VcpuFault::TripleFault { vcpu, regs })
                }
                Ok(VcpuExit::InternalError) => {
                    let suberror = self.internal_suberror();
                    let regs = describe_registers(&self.fd);
                    return VcpuOutcome::Fault(VcpuFault::InternalError {
                        vcpu,
                        suberror,
                        regs,
                    });
                }
                Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                    let regs = describe_registers(&self.fd);
                    return VcpuOutcome::Fault(VcpuFault::FailEntry { vcpu, reason, regs });
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    match lazy_access(&self.lazy_slot, &self.ram, addr, data, false) {
                        Ok(true) => Next::Run,
                        Ok(false) => Next::Mmio(addr, None),
                        Err(what) => Next::Mmio(addr, Some(what)),
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data))
                    if self.rom.as_ref().is_some_and(|r| r.covers(addr)) =>
                {
                    if let Some(r) = &self.rom {
                        r.refuse_write(vcpu, addr, data.len());
                    }
                    Next::Run
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let mut bytes = data.to_vec();
                    match lazy_access(&self.lazy_slot, &self.ram, addr, &mut bytes, true) {
                        Ok(true) => Next::Run,
                        Ok(false) => Next::Mmio(addr, None),
                        Err(what) => Next::Mmio(addr, Some(what)),
                    }
                }
                Ok(other) => {
                    let what = format!("{other:?}");
                    let regs = describe_registers(&self.fd);
                    return VcpuOutcome::Fault(VcpuFault::UnexpectedExit { vcpu, what, regs });
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Run,
                Err(source) => return VcpuOutcome::Fault(VcpuFault::Run { vcpu, source }),
            };
            if completing {
                self.fd.set_kvm_immediate_exit(0);
            }
            match next {
                Next::Run => {}
                Next::Exit(outcome) => return outcome,
                Next::Fault(make) => {
                    return VcpuOutcome::Fault(make(vcpu, describe_registers(&self.fd)))
                }
                Next::Mmio(addr, why) => {
                    let regs = describe_registers(&self.fd);
                    // This host reports an access to a poisoned page as MMIO
                    // at its address (the lazy slot's memory included: its
                    // access then fails): look the page up in the table.
                    let page = addr & !0xfff;
                    if self.ram.table().get(page).marker_kind() == Some(guest_mem::Marker::Poisoned)
                    {
                        return VcpuOutcome::Fault(VcpuFault::MemoryError { vcpu, addr, regs });
                    }
                    if let Some(what) = why {
                        return VcpuOutcome::Fault(VcpuFault::UnexpectedExit {
                            vcpu,
                            what: format!("guest RAM at {addr:#x} (its lazy memory slot): {what}"),
                            regs,
                        });
                    }
                    return VcpuOutcome::Fault(VcpuFault::Unmapped { vcpu, addr, regs });
                }
            }
        }
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member
        // of the exit union is the one KVM filled in.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    fn io_out(&mut self, port: u16, data: &[u8]) -> Next {
        let vcpu = self.index;
        if port == IDLE_PORT {
            self.idle_wait();
            return Next::Run;
        }
        if port == SERIAL_PORT {
            for b in data {
                if let Some(line) = self.serial.push(*b) {
                    self.tx.send(VcpuMsg::Serial { vcpu, line });
                }
            }
            return Next::Run;
        }
        if let Some(b) = self
            .block
            .as_ref()
            .filter(|_| crate::devices::block::BlockDevice::claims(port))
        {
            b.io_out(vcpu, port, data);
            return Next::Run;
        }
        if !ControlLatch::claims(port) {
            log::debug!("vCPU {vcpu}: write to unclaimed port {port:#x} ignored");
            return Next::Run;
        }
        match self.latch.write(port, data) {
            ControlWrite::Latched => Next::Run,
            ControlWrite::Event(event, arg) => {
                self.tx.send(VcpuMsg::Event { vcpu, event, arg });
                match event {
                    Event::Done => Next::Exit(VcpuOutcome::Done),
                    Event::Panic => Next::Exit(VcpuOutcome::Panicked),
                    _ => Next::Run,
                }
            }
            ControlWrite::Unknown(code) => Next::Exit(VcpuOutcome::Fault(VcpuFault::Protocol {
                vcpu,
                what: format!("unknown event code {code:#x} on the control port"),
            })),
            ControlWrite::BadWidth(port, len) => {
                Next::Exit(VcpuOutcome::Fault(VcpuFault::Protocol {
                    vcpu,
                    what: format!("{len}-byte write to control port {port:#x} (expected 4 bytes)"),
                }))
            }
        }
    }
}

impl VcpuRunner {
    /// The guest waits for its next command (`IDLE_PORT`): hold this
    /// thread, off the CPU, until one may be there. "There" is read from
    /// guest memory: the command word's `seq` differs from the last one the
    /// guest acted on (its state page).
    fn idle_wait(&self) {
        use guest_protocol::boot_info::{command_gpa, last_command_seq_gpa, Command};
        let v = self.index as u64;
        let pending = || {
            match (
                self.ram.load_u64(command_gpa(v)),
                self.ram.load_u64(last_command_seq_gpa(v)),
            ) {
                (Ok(word), Ok(taken)) => Command::unpack(word).0 as u64 != taken,
                // Unreadable: let the guest find out.
                _ => true,
            }
        };
        self.control.idle_wait(IDLE_WAIT_MAX, &pending);
    }
}

/// The longest a vCPU is held at `IDLE_PORT` without news.
const IDLE_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(10);

/// After its first I/O exit, a vCPU of a set released together waits for
/// the set's other vCPUs to make theirs until none has for this long (see
/// [`VcpuRunner::with_start_gate`]): long enough between two answers of a
/// large set on a small host, short enough that a member whose guest is
/// busy elsewhere holds the others only briefly.
pub const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// An MMIO exit inside the lazy slot's memory: adds the slot and does the
/// access on guest RAM (KVM completes the instruction with `data` for a
/// read). False when the address is not that memory.
fn lazy_access(
    slot: &Option<Arc<crate::vstate::vm::LazySlot>>,
    ram: &GuestRam,
    addr: u64,
    data: &mut [u8],
    write: bool,
) -> Result<bool, String> {
    let Some(slot) = slot.as_ref().filter(|s| s.covers(addr)) else {
        return Ok(false);
    };
    slot.ensure().map_err(|e| e.to_string())?;
    let done = if write {
        ram.write(addr, data)
    } else {
        ram.read(addr, data)
    };
    done.map(|()| true).map_err(|e| e.to_string())
}
