fn main() -> std::process::ExitCode {
    master_target::run_cli()
}
