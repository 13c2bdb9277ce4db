//! The client commands (filled in by the CLI work).

use clap::Subcommand;

#[derive(Subcommand)]
pub enum ClientCmd {
    /// Log in to a server and keep the token.
    Login,
}

pub fn run(cmd: ClientCmd) -> anyhow::Result<()> {
    match cmd {
        ClientCmd::Login => anyhow::bail!("not yet"),
    }
}
