//! The `brigade` binary: the command line lives in [`cli`].

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        // One line: the error and its causes, `: `-separated.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
