//! The `outpost` binary: parses the command line, starts logging, loads configuration,
//! calls into the library, and alone maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use outpost::app::Daemon;
use outpost::cli::{self, Cli, Command};

fn serve(path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let source = match &path {
        Some(path) => path.display().to_string(),
        None => "the embedded default (outpost config default prints it)".to_owned(),
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %source, "outpost starting");
    let config = cli::load_config(path.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let daemon = Daemon::start(config).await?;
        daemon.run_until_signalled(path.as_deref()).await
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // journald when systemd connected stderr to the journal, readable stderr lines otherwise.
    outpost::systemd::init_logging();
    let result = match cli.command {
        Command::Serve { config } => serve(config).map(|()| None),
        other => cli::run(other).map(Some),
    };
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(outcome)) => {
            print!("{}", outcome.stdout);
            eprint!("{}", outcome.stderr);
            if outcome.failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("outpost: {}", cli::error_text(&e));
            ExitCode::from(cli::exit_status(&e))
        }
    }
}
