//! Watches Services, EndpointSlices and Nodes through the Kubernetes API with kube-rs.
