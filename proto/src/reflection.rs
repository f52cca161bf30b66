//! gRPC server reflection over every `switchyard.v1` service and gRPC health, in both
//! protocol versions (`v1` for current clients such as grpcurl, `v1alpha` for older ones).

use tonic_reflection::server::{Builder, v1, v1alpha};

use crate::FILE_DESCRIPTOR_SET;

fn builder() -> Builder<'static> {
    Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The `grpc.reflection.v1.ServerReflection` service.
pub fn v1() -> v1::ServerReflectionServer<impl v1::ServerReflection> {
    builder()
        .build_v1()
        .expect("descriptor sets are built into the binary")
}

/// The `grpc.reflection.v1alpha.ServerReflection` service.
pub fn v1alpha() -> v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection> {
    builder()
        .build_v1alpha()
        .expect("descriptor sets are built into the binary")
}
