//! Runs clusters and takes the comparison's samples.
