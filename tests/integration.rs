//! The integration tests, in one binary: one module per area.

mod shaders;
