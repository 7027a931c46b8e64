//! Destinations the flush threads write to (the per-signal `Exporter`s live with their
//! signal and use these).
pub mod file;
