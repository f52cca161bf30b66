//! End-to-end tests and benchmarks for switchyard.
#![forbid(unsafe_code)]
