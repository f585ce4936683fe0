//! The `vmm` binary.

fn main() {
    // Before any thread exists, so every thread inherits the mask and Ctrl-C
    // reaches the event loop's signalfd only.
    vmm::signals::block_termination_signals();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("vmm: internal error (this is a bug): {info}");
    }));
    let code = std::panic::catch_unwind(|| vmm::cli::main(std::env::args_os()))
        .unwrap_or(vmm::report::EXIT_ERROR);
    std::process::exit(code);
}
