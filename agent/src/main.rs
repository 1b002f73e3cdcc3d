fn main() -> std::process::ExitCode {
    agent::run_cli()
}
