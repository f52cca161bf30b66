//! Writes the comparison's `report.md`.
