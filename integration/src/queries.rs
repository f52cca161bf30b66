//! Query API calls several tests make the same way.

use switchyard_proto::v1::{
    GetNodeEffectiveStateRequest, GetNodeEffectiveStateResponse, NodeStatus,
    controller_query_client::ControllerQueryClient,
};
use tonic::transport::Channel;

/// Every page of `ControllerQuery/GetNodeEffectiveState` for `node`, with kernel
/// objects, `page_size` Services a page (0: the default).
pub async fn effective_state_pages(
    client: &mut ControllerQueryClient<Channel>,
    node: &str,
    page_size: u32,
) -> Result<Vec<GetNodeEffectiveStateResponse>, tonic::Status> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .get_node_effective_state(GetNodeEffectiveStateRequest {
                node_name: node.into(),
                include_kernel_objects: true,
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        page_token = page.next_page_token.clone();
        pages.push(page);
        if page_token.is_empty() {
            return Ok(pages);
        }
    }
}

/// Why `status` (a node as one controller lists it) is not "connected, in sync, served
/// by `replica`, from a registry that is not stale", or `None` if it is.
pub fn not_served_in_sync(status: &NodeStatus, replica: &str) -> Option<String> {
    (!status.connected
        || status.replica != replica
        || status.pending_changes != 0
        || status.possibly_stale
        || status.desired_version.is_empty()
        || status.acked_version != status.desired_version)
        .then(|| format!("{status:?}"))
}
