//! The `Control` service on a gateway, so a client needs one address: invocations and
//! their logs are served here, from this gateway's workers and memory; everything else is
//! passed to the control plane with the caller's own token (the replica authorises it), and
//! a write through here is visible to the next call through here (the gateway waits for its
//! watch to reach the write's applied index).
//!
//! ```text
//!  Invoke ─▶ Callers (token → tenant) ─▶ Router            GetLogs ─▶ the router's rings
//!  Deploy / Delete / … ─▶ replica (caller's token, leader-following) ─▶ view catches up
//!  GetFunction / ListFunctions ─▶ replica, `ready` filled from this gateway's hub
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stellar_proto::client::{ClusterClient, Control};
use stellar_proto::tokens::bearer;
use stellar_proto::v1 as pb;
use stellar_proto::wire::{ERROR_METADATA, FORWARDED_METADATA};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Callers;
use crate::router::{CallContext, Router};

/// How long a write through this gateway waits for the gateway's own view to show it.
const READ_YOUR_WRITES: Duration = Duration::from_secs(2);

/// The `Control` service of one gateway (see the module docs).
#[derive(Debug, Clone)]
pub struct GatewayControl {
    router: Arc<Router>,
    callers: Arc<Callers>,
    client: ClusterClient,
}

impl GatewayControl {
    /// Serves invocations with `router`, callers named by `callers`, the rest through
    /// `client` (the control plane's replicas).
    pub fn new(router: Arc<Router>, callers: Arc<Callers>, client: ClusterClient) -> Self {
        GatewayControl {
            router,
            callers,
            client,
        }
    }

    /// Passes one call to the control plane with the caller's token.
    async fn pass<Req, Resp, F, Fut>(&self, req: Request<Req>, f: F) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(Control, Req) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let token = bearer(req.metadata())?.to_string();
        let body = req.into_inner();
        self.client
            .with_token(&token)
            .call(|c| f(c, body.clone()))
            .await
    }

    /// Marks which of a function's allocations can serve a call now: ready on this
    /// gateway's workers, or reported running by a worker that another gateway holds (this
    /// gateway forwards calls there).
    fn with_ready(&self, mut f: pb::FunctionStatus) -> pb::FunctionStatus {
        let allocs: Vec<(u64, u64)> = f.allocations.iter().map(|a| (a.id, a.node)).collect();
        let mut ready = self.router.hub().ready_of(&allocs);
        let view = self.router.view();
        for a in &f.allocations {
            let elsewhere = view
                .gateway_of(a.node)
                .is_some_and(|g| !g.is_empty() && !self.router.is_me(&g));
            if elsewhere
                && a.state == pb::AllocationState::Running as i32
                && view.node_state(a.node) == Some(pb::NodeState::Ready as i32)
                && !ready.contains(&a.id)
            {
                ready.push(a.id);
            }
        }
        f.ready = ready;
        f
    }
}

/// Marks an UNAVAILABLE answer given before an invocation was routed, so clients may retry
/// it (`x-stellar-error: UNAVAILABLE`).
fn not_run(mut s: Status) -> Status {
    if s.code() == tonic::Code::Unavailable && s.metadata().get(ERROR_METADATA).is_none() {
        s.metadata_mut().insert(
            ERROR_METADATA,
            tonic::metadata::MetadataValue::from_static("UNAVAILABLE"),
        );
    }
    s
}

#[tonic::async_trait]
impl pb::control_server::Control for GatewayControl {
    async fn deploy(
        &self,
        req: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = self
            .pass(req, |mut c, r| async move { c.deploy(r).await })
            .await?;
        self.router
            .view()
            .wait_for(r.applied_index, READ_YOUR_WRITES)
            .await;
        Ok(Response::new(r))
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let r = self
            .pass(req, |mut c, r| async move { c.allocate(r).await })
            .await?;
        self.router
            .view()
            .wait_for(r.applied_index, READ_YOUR_WRITES)
            .await;
        Ok(Response::new(r))
    }

    async fn invoke(
        &self,
        req: Request<pb::InvokeRequest>,
    ) -> Result<Response<pb::InvokeResponse>, Status> {
        // Refused before routing: stamped so a client knows it did not run (an unmarked
        // UNAVAILABLE may be a connection lost mid-call).
        let token = bearer(req.metadata()).map_err(not_run)?.to_string();
        let caller = self.callers.resolve(&token).await.map_err(not_run)?;
        let forwarded = req.metadata().get(FORWARDED_METADATA).is_some();
        let r = req.into_inner();
        let tenant = caller.tenant_for(&r.tenant)?;
        self.router
            .invoke(tenant, r, &CallContext { token, forwarded })
            .await
            .map(Response::new)
            .map_err(crate::error::GatewayError::into_status)
    }

    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.get_usage(r).await })
            .await
            .map(Response::new)
    }

    async fn put_blob(
        &self,
        req: Request<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::PutBlobResponse>, Status> {
        // A stream is sent once: a failed upload is retried by the client, whole (blobs
        // are content-addressed, so a retry stores nothing twice).
        let token = bearer(req.metadata())?.to_string();
        let mut inbound = Some(req.into_inner());
        self.client
            .with_token(&token)
            .call_with(stellar_proto::client::RetryPolicy::Unrun, |mut c| {
                let chunks = inbound.take();
                async move {
                    let Some(chunks) = chunks else {
                        return Err(Status::unavailable(
                            "the control plane's leader changed during the upload; upload again",
                        ));
                    };
                    let chunks = tokio_stream::StreamExt::map_while(chunks, Result::ok);
                    c.put_blob(chunks).await
                }
            })
            .await
            .map(Response::new)
    }

    type GetBlobStream = Streaming<pb::BlobChunk>;

    async fn get_blob(
        &self,
        req: Request<pb::GetBlobRequest>,
    ) -> Result<Response<Self::GetBlobStream>, Status> {
        self.pass(req, |mut c, r| async move { c.get_blob(r).await })
            .await
            .map(Response::new)
    }

    async fn submit_job(
        &self,
        mut req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        // The job's data enters here: unless the client named a place, its tasks should run
        // near this gateway.
        if let Some(spec) = req.get_mut().spec.as_mut()
            && spec.near.is_none()
        {
            spec.near = Some(self.router.coordinate());
        }
        self.pass(req, |mut c, r| async move { c.submit_job(r).await })
            .await
            .map(Response::new)
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.pass(req, |mut c, r| async move { c.get_job(r).await })
            .await
            .map(Response::new)
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.list_jobs(r).await })
            .await
            .map(Response::new)
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.pass(req, |mut c, r| async move { c.cancel_job(r).await })
            .await
            .map(Response::new)
    }

    async fn stat_blobs(
        &self,
        req: Request<pb::StatBlobsRequest>,
    ) -> Result<Response<pb::StatBlobsResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.stat_blobs(r).await })
            .await
            .map(Response::new)
    }

    type AllocateStreamStream = futures::stream::Empty<Result<pb::AllocateResponse, Status>>;

    async fn allocate_stream(
        &self,
        _req: Request<Streaming<pb::AllocateRequest>>,
    ) -> Result<Response<Self::AllocateStreamStream>, Status> {
        Err(Status::failed_precondition(
            "AllocateStream is served by the control plane's replicas; call a replica's address",
        ))
    }

    async fn get_function(
        &self,
        req: Request<pb::GetFunctionRequest>,
    ) -> Result<Response<pb::FunctionStatus>, Status> {
        self.pass(req, |mut c, r| async move { c.get_function(r).await })
            .await
            .map(|f| Response::new(self.with_ready(f)))
    }

    async fn list_functions(
        &self,
        req: Request<pb::ListFunctionsRequest>,
    ) -> Result<Response<pb::ListFunctionsResponse>, Status> {
        let mut r = self
            .pass(req, |mut c, r| async move { c.list_functions(r).await })
            .await?;
        r.functions = r
            .functions
            .into_iter()
            .map(|f| self.with_ready(f))
            .collect();
        Ok(Response::new(r))
    }

    async fn delete_function(
        &self,
        req: Request<pb::DeleteFunctionRequest>,
    ) -> Result<Response<pb::DeleteFunctionResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.delete_function(r).await })
            .await
            .map(Response::new)
    }

    async fn register_nodes(
        &self,
        req: Request<pb::RegisterNodesRequest>,
    ) -> Result<Response<pb::RegisterNodesResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.register_nodes(r).await })
            .await
            .map(Response::new)
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.list_nodes(r).await })
            .await
            .map(Response::new)
    }

    async fn get_receipt_proof(
        &self,
        req: Request<pb::GetReceiptProofRequest>,
    ) -> Result<Response<pb::GetReceiptProofResponse>, Status> {
        // A node owner asks with a signature and no token: forwarded with none (never with
        // this gateway's own admin token), so the replica checks the signature.
        let token = bearer(req.metadata()).unwrap_or_default().to_string();
        let body = req.into_inner();
        self.client
            .with_token(&token)
            .call(|mut c| {
                let body = body.clone();
                async move { c.get_receipt_proof(body).await }
            })
            .await
            .map(Response::new)
    }

    async fn set_node_state(
        &self,
        req: Request<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::SetNodeStateResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.set_node_state(r).await })
            .await
            .map(Response::new)
    }

    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.create_tenant(r).await })
            .await
            .map(Response::new)
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.create_token(r).await })
            .await
            .map(Response::new)
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.revoke_token(r).await })
            .await
            .map(Response::new)
    }

    async fn get_logs(
        &self,
        req: Request<pb::GetLogsRequest>,
    ) -> Result<Response<pb::GetLogsResponse>, Status> {
        let token = bearer(req.metadata())?.to_string();
        let caller = self.callers.resolve(&token).await?;
        let r = req.into_inner();
        let tenant = caller.tenant_for(&r.tenant)?;
        // NOT_FOUND for a function this tenant does not have (not an empty list).
        let Some(route) = self.router.view().route(&tenant, &r.name) else {
            return Err(Status::not_found(format!(
                "function {} not found in tenant {}",
                stellar_proto::text::shown(&r.name),
                stellar_proto::text::shown(&tenant)
            )));
        };
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) } as usize;
        let mut invocations = self.router.logs(&tenant, &r.name, limit);
        // Workers that could not load the current version say why first: no call ran.
        if route.load_failures > 0 {
            invocations.insert(
                0,
                pb::InvocationLog {
                    error_code: "MODULE_LOAD_FAILED".into(),
                    error_message: format!(
                        "version {} failed to load on {} worker(s); last reason: {}",
                        route.version, route.load_failures, route.load_error
                    ),
                    ..Default::default()
                },
            );
            invocations.truncate(limit);
        }
        Ok(Response::new(pb::GetLogsResponse { invocations }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let token = bearer(req.metadata())?.to_string();
        let c = self.callers.resolve(&token).await?;
        Ok(Response::new(pb::WhoAmIResponse {
            tenant: c.tenant,
            admin: c.admin,
        }))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        // A health probe: answered by whichever replica answers, with the gateway's token.
        self.client
            .call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
            .await
            .map(Response::new)
    }

    async fn add_replica(
        &self,
        req: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.add_replica(r).await })
            .await
            .map(Response::new)
    }

    async fn remove_replica(
        &self,
        req: Request<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.pass(req, |mut c, r| async move { c.remove_replica(r).await })
            .await
            .map(Response::new)
    }
}
