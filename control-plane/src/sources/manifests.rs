//! Reads a folder of YAML/JSON manifests and watches it for changes: the embedded
//! default when no cluster is configured.
