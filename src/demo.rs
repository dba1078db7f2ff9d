pub async fn run(_f: Option<&str>) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
