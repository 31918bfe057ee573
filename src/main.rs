//! The `brigade` binary: the command line lives in [`cli`].

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        eprintln!("error: {}", cli::one_line(&e));
        std::process::exit(1);
    }
}
