//! The integration tests, in one binary: one module per area.

mod backends;
mod checkpoints;
#[cfg(feature = "cli")]
mod cli;
mod common;
mod format;
mod layout;
#[cfg(feature = "cli")]
mod reliability;
mod shaders;
