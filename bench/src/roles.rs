//! The three roles in one executable, chosen by the name it is run as (argv[0]), as
//! busybox does. `bench demo` and the end-to-end tests start each role as a real process of
//! this executable with `argv[0]` set to the role's name.

use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;

/// The role binaries this executable can act as.
pub const ROLES: [&str; 3] = ["agent", "process-server", "master-target"];

/// Runs the role named by argv[0], if argv[0] names one.
pub fn dispatch() -> Option<ExitCode> {
    let argv0 = std::env::args_os().next()?;
    let name = Path::new(&argv0).file_name().and_then(OsStr::to_str)?;
    match name {
        "agent" => Some(agent::run_cli()),
        "process-server" => Some(process_server::run_cli()),
        "master-target" => Some(master_target::run_cli()),
        _ => None,
    }
}

/// Runs the role named by argv[0], or explains how this executable is meant to be run.
pub fn dispatch_or_exit() -> ExitCode {
    dispatch().unwrap_or_else(|| {
        eprintln!(
            "run this executable with argv[0] set to one of: {}",
            ROLES.join(", ")
        );
        ExitCode::from(2)
    })
}
