//! The `engram` command line: one subcommand per file under src/cli/.

mod cli;

use clap::Parser;

/// `engram ... | head` closes stdout early, and `println!` then panics with "failed printing to
/// stdout: Broken pipe". Exit quietly instead, as Unix tools do; every other panic is reported
/// by the default hook as before.
fn exit_quietly_on_broken_pipe() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload().downcast_ref::<String>().map(String::as_str).or_else(|| info.payload().downcast_ref::<&str>().copied()).unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
}

fn main() {
    exit_quietly_on_broken_pipe();
    let args = cli::Cli::parse();
    if let Err(error) = cli::run(args) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
