//! The integration tests, in one binary: one module per area.

mod backends;
mod checkpoints;
mod cli;
mod common;
mod format;
mod layout;
mod reliability;
mod remote;
mod shaders;
