//! Turns Kubernetes API objects into the validated [`crate::model`] types, with an error
//! naming the field for anything kube-proxy would not accept. Pure; no I/O.

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};

use crate::model::{EndpointSlice, Node, Service};

/// Why an API object cannot be used. Never retryable: the same object fails the same
/// way until someone edits it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    /// A field holds a value the API (or kube-proxy) does not accept.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

pub fn service(object: &core::Service) -> Result<Service, ConvertError> {
    let _ = object;
    todo!("convert::service")
}

/// `Ok(None)` for slices a proxy ignores (FQDN address type).
pub fn endpoint_slice(
    object: &discovery::EndpointSlice,
) -> Result<Option<EndpointSlice>, ConvertError> {
    let _ = object;
    todo!("convert::endpoint_slice")
}

pub fn node(object: &core::Node) -> Result<Node, ConvertError> {
    let _ = object;
    todo!("convert::node")
}
