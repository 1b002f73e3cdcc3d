fn main() -> std::process::ExitCode {
    process_server::run_cli()
}
