//! The `switchyard-controller` binary.

fn main() {}
