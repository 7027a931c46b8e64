//! Exporters shared by the module kinds.
pub mod file;
