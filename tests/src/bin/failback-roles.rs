//! The three roles in one executable, chosen by argv[0] (`agent`, `process-server`,
//! `master-target`), so that end-to-end tests can run each as a real process.
fn main() -> std::process::ExitCode {
    bench::roles::dispatch_or_exit()
}
