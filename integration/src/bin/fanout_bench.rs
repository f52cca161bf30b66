//! Controller fan-out benchmark (written in the next step).
fn main() {}
