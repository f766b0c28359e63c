//! Placeholder until the CUDA backend lands.
