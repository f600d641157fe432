//! The replica's gRPC services: `Control` (clients and gateways) and `Raft` (peers); `Edge`
//! is in `edge.rs`. Requests are validated here for size and shape, handed to the replica
//! thread, and errors become `tonic::Status` only here and there, with a leader hint in
//! `x-stellar-leader` metadata. Invocations are not served here: gateways serve them.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use protobuf::Message as _;
use raft::eraftpb::Message;
use stellar_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::auth::TokenCache;
use crate::blob_transfer::{Blobs, status as blob_status};
use crate::error::{ApplyError, Error};
use crate::replica::{Query, Reply, Request, deploy_command, node_state_command};
use crate::replica_thread::ReplicaHandle;
use crate::state::{
    MAX_MODULE_BYTES, MAX_NODES_PER_COMMAND, MAX_REQUEST_ID_BYTES, node_state_from_pb,
};
use stellar_proto::tokens::Caller;

pub use stellar_proto::limits::MAX_MESSAGE_BYTES;
use stellar_proto::wire::LEADER_METADATA;
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(2);
const READ_ATTEMPTS: u32 = 3;
/// How far a signed receipt-proof request's time may be from this replica's clock.
const PROOF_CLOCK_SKEW_MS: u64 = 300_000;

/// Maps a control-plane error to a gRPC status a client can act on.
pub fn to_status(e: Error) -> Status {
    let msg = crate::error::clip_message(e.to_string());
    match e {
        Error::NotLeader { address, .. } => {
            let mut s = Status::unavailable(msg);
            if let Some(a) = address
                && let Ok(v) = a.parse()
            {
                s.metadata_mut().insert(LEADER_METADATA, v);
            }
            s
        }
        Error::Apply(a) => match a {
            ApplyError::Invalid(_) => Status::invalid_argument(msg),
            ApplyError::NotFound(_) => Status::not_found(msg),
            ApplyError::AlreadyExists(_) => Status::already_exists(msg),
            ApplyError::StalePlan(_) => Status::aborted(msg),
            ApplyError::Limit(_) => Status::resource_exhausted(msg),
        },
        Error::Placement(_) => Status::failed_precondition(msg),
        Error::OutcomeUnknown | Error::Stopped | Error::Storage(_) => Status::unavailable(msg),
        Error::Overloaded => Status::resource_exhausted(msg),
        Error::Timeout(_) => Status::deadline_exceeded(msg),
        Error::Config(_) => Status::internal(msg),
    }
}

fn request_id(id: Vec<u8>) -> Result<Vec<u8>, Status> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "request_id is {} bytes; at most {MAX_REQUEST_ID_BYTES} (16 random bytes is usual; empty disables de-duplication)",
            id.len()
        )));
    }
    Ok(id)
}

/// Refuses a token hash that is not a sha256.
fn token_sha256(h: &[u8]) -> Result<(), Status> {
    if h.len() == 32 {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "token_sha256 must be the 32-byte sha256 of the token",
        ))
    }
}

/// Why a replica does not serve a call that belongs to a gateway.
fn gateway_only(what: &str) -> Status {
    Status::failed_precondition(format!(
        "{what} are served by gateways, not by control-plane replicas: point --control (or STELLAR_CONTROL) at a `stellar gateway` address"
    ))
}

fn applied(r: Reply) -> Result<pb::CommandResult, Status> {
    match r {
        Reply::Applied(r) => Ok(r),
        other => Err(Status::internal(format!("unexpected reply {other:?}"))),
    }
}

/// The `Control` service of one replica.
#[derive(Debug, Clone)]
pub struct ControlService {
    replica: ReplicaHandle,
    auth: std::sync::Arc<TokenCache>,
    blobs: Blobs,
}

impl ControlService {
    /// Serves `replica`; callers are named by `auth`.
    pub fn new(replica: ReplicaHandle, auth: std::sync::Arc<TokenCache>, blobs: Blobs) -> Self {
        ControlService {
            replica,
            auth,
            blobs,
        }
    }

    /// Refuses an image whose layers are not stored on enough replicas yet.
    async fn check_layers_stored(&self, image: &pb::ContainerImage) -> Result<(), Status> {
        for l in &image.layers {
            let what = format!("image layer {}", l.sha256);
            (self.blobs)
                .check_stored(&what, &l.sha256, l.size, "`stellar deploy --image` does")
                .await?;
        }
        Ok(())
    }

    /// Refuses job inputs that are not stored on enough replicas, or not at the size named.
    async fn check_blobs_stored(&self, blobs: &[pb::BlobRef]) -> Result<(), Status> {
        for b in blobs {
            let what = format!("input `{}` ({})", b.name, b.sha256);
            (self.blobs)
                .check_stored(&what, &b.sha256, b.size, "`stellar job run` does")
                .await?;
        }
        Ok(())
    }

    async fn job_status(
        &self,
        tenant: String,
        name: String,
        read: Option<pb::ReadOptions>,
    ) -> Result<pb::JobStatus, Status> {
        match self.read(Query::Job { tenant, name }, read).await? {
            Reply::Job(j) => Ok(*j),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn caller<T>(&self, req: &GrpcRequest<T>) -> Result<Caller, Status> {
        self.auth.caller(req.metadata()).await
    }

    async fn admin<T>(&self, req: &GrpcRequest<T>, what: &str) -> Result<Caller, Status> {
        let c = self.caller(req).await?;
        c.require_admin(what)?;
        Ok(c)
    }

    async fn write(&self, request: Request) -> Result<pb::CommandResult, Status> {
        let r = self
            .replica
            .write(request, WRITE_TIMEOUT)
            .await
            .map_err(to_status)?;
        applied(r)
    }

    /// A read; a linearizable one that times out (no leader yet, or the leader changed and
    /// dropped the ReadIndex request) is retried before the caller is told.
    async fn read(&self, query: Query, read: Option<pb::ReadOptions>) -> Result<Reply, Status> {
        let stale = read.is_some_and(|r| r.stale);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.replica.read(query.clone(), stale, READ_TIMEOUT).await {
                Err(Error::Timeout(_)) if attempt < READ_ATTEMPTS => continue,
                r => return r.map_err(to_status),
            }
        }
    }

    async fn command(
        &self,
        request_id: Vec<u8>,
        kind: pb::command::Kind,
    ) -> Result<pb::CommandResult, Status> {
        self.write(Request::Command(pb::Command {
            request_id: self::request_id(request_id)?,
            kind: Some(kind),
        }))
        .await
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn deploy(
        &self,
        req: GrpcRequest<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let tenant = caller.tenant_for(&r.tenant)?;
        if let Some(image) = &r.image {
            if !r.module.is_empty() {
                return Err(Status::invalid_argument(
                    "pass a module or an image, not both",
                ));
            }
            stellar_proto::limits::check_image(image).map_err(Status::invalid_argument)?;
        } else if r.module.is_empty() {
            return Err(Status::invalid_argument(
                "module is empty; pass the .wasm bytes (or an image for a container function)",
            ));
        }
        if r.module.len() > MAX_MODULE_BYTES {
            return Err(Status::invalid_argument(format!(
                "module is {} bytes; the limit is {MAX_MODULE_BYTES}",
                r.module.len()
            )));
        }
        // Out-of-range limits are the caller's mistake, named as such (before planning, so
        // a 65537 MiB function is not reported as "no node has the memory").
        let limits = r.limits.unwrap_or_default();
        stellar_proto::limits::check_function_limits(&limits)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        crate::state::validate_name("function", &r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A module that cannot run is refused here, with the reason, rather than stored to
        // leave its allocation pending and its calls hanging; an image's layers must be in
        // the blob store on two replicas before the log refers to them.
        match &r.image {
            Some(image) => self.check_layers_stored(image).await?,
            None => stellar_proto::module_check::check_module(&r.module, limits.memory_mib)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        }
        let cmd = deploy_command(
            request_id(r.request_id)?,
            pb::DeployCmd {
                tenant: tenant.clone(),
                name: r.name.clone(),
                module: r.module,
                module_sha256: Vec::new(),
                limits: r.limits,
                replicas: r.replicas,
                region: r.region,
                constraints: r.constraints,
                idempotent: r.idempotent,
                place_on: Vec::new(),
                near_region: r.near_region,
                near_zone: r.near_zone,
                image: r.image,
            },
        );
        let sha = match &cmd.kind {
            Some(pb::command::Kind::Deploy(d)) => hex::encode(&d.module_sha256),
            _ => String::new(),
        };
        let res = self.write(Request::Deploy(cmd)).await?;
        // Why each replica went where it did (the leader keeps its placer's scores).
        let placements = match self
            .replica
            .read(
                Query::Function {
                    tenant,
                    name: r.name,
                },
                true,
                READ_TIMEOUT,
            )
            .await
        {
            Ok(Reply::Function(f)) => f.placements,
            _ => Vec::new(),
        };
        Ok(Response::new(pb::DeployResponse {
            version: res.version,
            module_sha256: sha,
            allocations: res.allocations,
            applied_index: 0,
            placements,
        }))
    }

    async fn allocate(
        &self,
        req: GrpcRequest<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let res = self
            .write(Request::Allocate {
                request_id: request_id(r.request_id)?,
                tenant: caller.tenant_for(&r.tenant)?,
                origin: crate::replica::origin_of(&r.near_region, &r.near_zone, r.near.as_ref()),
                function: r.function,
            })
            .await?;
        Ok(Response::new(pb::AllocateResponse {
            allocation: res.allocations.into_iter().next(),
            applied_index: self.replica.info().applied,
            ..Default::default()
        }))
    }

    type AllocateStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::AllocateResponse, Status>> + Send>>;

    async fn allocate_stream(
        &self,
        req: GrpcRequest<Streaming<pb::AllocateRequest>>,
    ) -> Result<Response<Self::AllocateStreamStream>, Status> {
        let caller = self.caller(&req).await?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::AllocateResponse, Status>>(256);
        let replica = self.replica.clone();
        tokio::spawn(async move {
            while let Some(r) = inbound.next().await {
                let Ok(r) = r else { break };
                let replica = replica.clone();
                let tx = tx.clone();
                let tenant = caller.tenant_for(&r.tenant);
                // Requests on one stream may be pipelined: each is answered when it applies.
                tokio::spawn(async move {
                    let rid = r.request_id.clone();
                    let res = match request_id(r.request_id).and_then(|id| Ok((id, tenant?))) {
                        Ok((id, tenant)) => replica
                            .write(
                                Request::Allocate {
                                    request_id: id,
                                    tenant,
                                    origin: crate::replica::origin_of(
                                        &r.near_region,
                                        &r.near_zone,
                                        r.near.as_ref(),
                                    ),
                                    function: r.function,
                                },
                                WRITE_TIMEOUT,
                            )
                            .await
                            .map_err(to_status)
                            .and_then(applied),
                        Err(s) => Err(s),
                    };
                    let msg = match res {
                        Ok(res) => pb::AllocateResponse {
                            allocation: res.allocations.into_iter().next(),
                            request_id: rid,
                            ..Default::default()
                        },
                        Err(s) => pb::AllocateResponse {
                            request_id: rid,
                            error_code: format!("{:?}", s.code()),
                            error_message: s.message().to_string(),
                            ..Default::default()
                        },
                    };
                    let _ = tx.send(Ok(msg)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn invoke(
        &self,
        _req: GrpcRequest<pb::InvokeRequest>,
    ) -> Result<Response<pb::InvokeResponse>, Status> {
        Err(gateway_only("invocations"))
    }

    async fn get_usage(
        &self,
        req: GrpcRequest<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        if r.cells {
            caller.require_admin("reading the ledger's cells (usage --audit)")?;
        }
        let tenant = caller.filter(&r.tenant)?;
        let since_hour = r.since_unix_ms / 3_600_000;
        let query = Query::Usage {
            tenant,
            since_hour,
            cells: r.cells,
        };
        match self.read(query, r.read).await? {
            Reply::Usage(u) => Ok(Response::new(u)),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn get_function(
        &self,
        req: GrpcRequest<pb::GetFunctionRequest>,
    ) -> Result<Response<pb::FunctionStatus>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        match self
            .read(
                Query::Function {
                    tenant: caller.tenant_for(&r.tenant)?,
                    name: r.name,
                },
                r.read,
            )
            .await?
        {
            Reply::Function(f) => Ok(Response::new(*f)),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn list_functions(
        &self,
        req: GrpcRequest<pb::ListFunctionsRequest>,
    ) -> Result<Response<pb::ListFunctionsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let tenant = caller.filter(&r.tenant)?;
        match self.read(Query::Functions { tenant }, r.read).await? {
            Reply::Functions(functions) => {
                Ok(Response::new(pb::ListFunctionsResponse { functions }))
            }
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn delete_function(
        &self,
        req: GrpcRequest<pb::DeleteFunctionRequest>,
    ) -> Result<Response<pb::DeleteFunctionResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let res = self
            .command(
                r.request_id,
                pb::command::Kind::DeleteFunction(pb::DeleteFunctionCmd {
                    tenant: caller.tenant_for(&r.tenant)?,
                    name: r.name,
                }),
            )
            .await?;
        Ok(Response::new(pb::DeleteFunctionResponse {
            stopped_allocations: res.count,
        }))
    }

    async fn register_nodes(
        &self,
        req: GrpcRequest<pb::RegisterNodesRequest>,
    ) -> Result<Response<pb::RegisterNodesResponse>, Status> {
        self.admin(&req, "registering nodes").await?;
        let r = req.into_inner();
        if r.nodes.is_empty() || r.nodes.len() > MAX_NODES_PER_COMMAND {
            return Err(Status::invalid_argument(format!(
                "register 1..={MAX_NODES_PER_COMMAND} nodes per call, got {}",
                r.nodes.len()
            )));
        }
        let nodes = r
            .nodes
            .into_iter()
            .map(|n| pb::NodeRecord {
                id: n.id,
                public_key: n.public_key,
                attributes: n.attributes,
                state: pb::NodeState::Ready as i32,
                reputation: n.reputation,
                managed: n.managed,
                gateway: String::new(),
            })
            .collect();
        let res = self
            .command(
                r.request_id,
                pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd { nodes }),
            )
            .await?;
        Ok(Response::new(pb::RegisterNodesResponse {
            registered: res.count,
            applied_index: 0,
        }))
    }

    async fn list_nodes(
        &self,
        req: GrpcRequest<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.admin(&req, "listing nodes").await?;
        let r = req.into_inner();
        let state = if r.state == 0 {
            None
        } else {
            Some(node_state_from_pb(r.state).map_err(|e| Status::invalid_argument(e.to_string()))?)
        };
        let query = Query::Nodes {
            region: (!r.region.is_empty()).then_some(r.region),
            state,
            limit: if r.limit == 0 {
                1000
            } else {
                r.limit.min(100_000) as usize
            },
        };
        match self.read(query, r.read).await? {
            Reply::Nodes(n) => Ok(Response::new(n)),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn get_receipt_proof(
        &self,
        req: GrpcRequest<pb::GetReceiptProofRequest>,
    ) -> Result<Response<pb::GetReceiptProofResponse>, Status> {
        let admin = match self.auth.caller(req.metadata()).await {
            Ok(c) => c.admin,
            Err(_) => false,
        };
        let r = req.into_inner();
        let signed = if admin {
            None
        } else if r.signature.is_empty() {
            return Err(Status::unauthenticated(
                "a receipt proof needs an admin token, or a request signed by the node's key \
                 (stellar receipts verify --data-dir WORKER_DIR)",
            ));
        } else if stellar_proto::clock::unix_ms().abs_diff(r.unix_ms) > PROOF_CLOCK_SKEW_MS {
            return Err(Status::unauthenticated(
                "the request was signed more than 5 minutes from this replica's clock; \
                 check the clock of the machine asking",
            ));
        } else {
            Some((r.unix_ms, r.signature))
        };
        let query = Query::ReceiptProof {
            node: r.node,
            period: (r.period != 0).then_some(r.period),
            signed,
        };
        match self.read(query, r.read).await? {
            Reply::ReceiptProof(p) => match *p {
                Ok(p) => Ok(Response::new(p)),
                Err(e @ crate::state::ProofError::Open { .. }) => {
                    Err(Status::failed_precondition(e.to_string()))
                }
                Err(e @ crate::state::ProofError::NotFound { .. }) => {
                    Err(Status::not_found(e.to_string()))
                }
                Err(e @ crate::state::ProofError::NotSigned { .. }) => {
                    Err(Status::unauthenticated(e.to_string()))
                }
            },
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn set_node_state(
        &self,
        req: GrpcRequest<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::SetNodeStateResponse>, Status> {
        self.admin(&req, "changing a node's state").await?;
        let r = req.into_inner();
        let cmd =
            node_state_command(request_id(r.request_id)?, r.node, r.state).map_err(to_status)?;
        let res = self.write(Request::Command(cmd)).await?;
        Ok(Response::new(pb::SetNodeStateResponse {
            previous: res.previous_state,
        }))
    }

    async fn create_tenant(
        &self,
        req: GrpcRequest<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        self.admin(&req, "creating a tenant").await?;
        let r = req.into_inner();
        self.command(
            r.request_id,
            pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
                name: r.name,
                token_sha256: r.token_sha256,
            }),
        )
        .await?;
        Ok(Response::new(pb::CreateTenantResponse {}))
    }

    async fn create_token(
        &self,
        req: GrpcRequest<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.admin(&req, "creating a token").await?;
        let r = req.into_inner();
        token_sha256(&r.token_sha256)?;
        self.command(
            r.request_id,
            pb::command::Kind::PutToken(pb::PutTokenCmd {
                tenant: if r.admin { String::new() } else { r.tenant },
                token_sha256: r.token_sha256,
                admin: r.admin,
            }),
        )
        .await?;
        Ok(Response::new(pb::CreateTokenResponse {}))
    }

    async fn revoke_token(
        &self,
        req: GrpcRequest<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        self.admin(&req, "revoking a token").await?;
        let r = req.into_inner();
        token_sha256(&r.token_sha256)?;
        self.command(
            r.request_id,
            pb::command::Kind::RevokeToken(pb::RevokeTokenCmd {
                token_sha256: r.token_sha256,
            }),
        )
        .await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn get_logs(
        &self,
        _req: GrpcRequest<pb::GetLogsRequest>,
    ) -> Result<Response<pb::GetLogsResponse>, Status> {
        Err(gateway_only("invocation logs"))
    }

    async fn who_am_i(
        &self,
        req: GrpcRequest<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(pb::WhoAmIResponse {
            tenant: c.tenant,
            admin: c.admin,
        }))
    }

    async fn put_blob(
        &self,
        req: GrpcRequest<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::PutBlobResponse>, Status> {
        self.caller(&req).await?;
        let (sha256, size) = self.blobs.receive(req.into_inner()).await?;
        let need = self.blobs.copies_needed().await;
        let copies = self.blobs.replicate(&sha256, need).await;
        if copies < need {
            return Err(Status::unavailable(format!(
                "blob {sha256} is stored on {copies} replica(s) but {need} are needed and no other replica took it; retry when the cluster is whole"
            )));
        }
        Ok(Response::new(pb::PutBlobResponse {
            sha256,
            size,
            copies: copies as u32,
        }))
    }

    async fn stat_blobs(
        &self,
        req: GrpcRequest<pb::StatBlobsRequest>,
    ) -> Result<Response<pb::StatBlobsResponse>, Status> {
        self.caller(&req).await?;
        let r = req.into_inner();
        if r.sha256.len() > stellar_proto::limits::MAX_IMAGE_LAYERS {
            return Err(Status::invalid_argument(format!(
                "{} blobs asked; at most {} per call",
                r.sha256.len(),
                stellar_proto::limits::MAX_IMAGE_LAYERS
            )));
        }
        let mut copies = Vec::with_capacity(r.sha256.len());
        for sha in &r.sha256 {
            if !stellar_proto::limits::is_sha256_hex(sha) {
                return Err(blob_status(crate::blobs::BlobError::BadName(sha.clone())));
            }
            copies.push(self.blobs.copies(sha).await as u32);
        }
        Ok(Response::new(pb::StatBlobsResponse {
            copies,
            needed: self.blobs.copies_needed().await as u32,
        }))
    }

    type GetBlobStream = tokio_stream::wrappers::ReceiverStream<Result<pb::BlobChunk, Status>>;

    async fn get_blob(
        &self,
        req: GrpcRequest<pb::GetBlobRequest>,
    ) -> Result<Response<Self::GetBlobStream>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        if !stellar_proto::limits::is_sha256_hex(&r.sha256) {
            return Err(blob_status(crate::blobs::BlobError::BadName(r.sha256)));
        }
        // A tenant reads only what its own jobs name; an admin reads anything stored.
        if !caller.admin || !r.tenant.is_empty() {
            let tenant = caller.tenant_for(&r.tenant)?;
            let ok = matches!(
                self.read(
                    Query::JobBlob {
                        tenant: tenant.clone(),
                        sha256: r.sha256.clone(),
                    },
                    None,
                )
                .await?,
                Reply::Flag(true)
            );
            if !ok {
                return Err(Status::not_found(format!(
                    "no job of tenant `{tenant}` names blob {}",
                    r.sha256
                )));
            }
        }
        self.blobs.ensure_local(&r.sha256).await?;
        Ok(Response::new(self.blobs.send(&r.sha256, r.offset).await?))
    }

    async fn submit_job(
        &self,
        req: GrpcRequest<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let tenant = caller.tenant_for(&r.tenant)?;
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("SubmitJob needs a spec"))?;
        stellar_proto::job_spec::check_job_spec(&spec).map_err(Status::invalid_argument)?;
        // Bytes never go through the log: inputs and layers must be on two replicas first.
        self.check_blobs_stored(&spec.inputs).await?;
        for st in &spec.stages {
            if let Some(image) = &st.image {
                self.check_layers_stored(image).await?;
            }
        }
        let name = spec.name.clone();
        self.command(
            r.request_id,
            pb::command::Kind::SubmitJob(pb::SubmitJobCmd {
                tenant: tenant.clone(),
                spec: Some(spec),
                unix_ms: stellar_proto::clock::unix_ms(),
            }),
        )
        .await?;
        tracing::info!(%tenant, job = %name, "job submitted");
        Ok(Response::new(self.job_status(tenant, name, None).await?))
    }

    async fn get_job(
        &self,
        req: GrpcRequest<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let tenant = caller.tenant_for(&r.tenant)?;
        Ok(Response::new(
            self.job_status(tenant, r.name, r.read).await?,
        ))
    }

    async fn list_jobs(
        &self,
        req: GrpcRequest<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let tenant = caller.filter(&r.tenant)?;
        match self.read(Query::Jobs { tenant }, r.read).await? {
            Reply::Jobs(jobs) => Ok(Response::new(pb::ListJobsResponse { jobs })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn cancel_job(
        &self,
        req: GrpcRequest<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let tenant = caller.tenant_for(&r.tenant)?;
        self.command(
            r.request_id,
            pb::command::Kind::CancelJob(pb::CancelJobCmd {
                tenant: tenant.clone(),
                name: r.name.clone(),
                unix_ms: stellar_proto::clock::unix_ms(),
            }),
        )
        .await?;
        Ok(Response::new(self.job_status(tenant, r.name, None).await?))
    }

    async fn cluster_status(
        &self,
        _req: GrpcRequest<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let s = self.replica.status().await.map_err(to_status)?;
        Ok(Response::new(s))
    }

    async fn add_replica(
        &self,
        req: GrpcRequest<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.admin(&req, "adding a replica").await?;
        let r = req.into_inner();
        if r.address.parse::<std::net::SocketAddr>().is_err() && !r.address.contains(':') {
            return Err(Status::invalid_argument(format!(
                "address `{}` is not HOST:PORT",
                r.address
            )));
        }
        membership(
            self.replica
                .write(
                    Request::AddReplica {
                        id: r.id,
                        address: r.address,
                    },
                    WRITE_TIMEOUT,
                )
                .await,
        )
    }

    async fn remove_replica(
        &self,
        req: GrpcRequest<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.admin(&req, "removing a replica").await?;
        let r = req.into_inner();
        membership(
            self.replica
                .write(Request::RemoveReplica { id: r.id }, WRITE_TIMEOUT)
                .await,
        )
    }
}

fn membership(r: crate::Result<Reply>) -> Result<Response<pb::MembershipResponse>, Status> {
    match r.map_err(to_status)? {
        Reply::Membership(replicas) => Ok(Response::new(pb::MembershipResponse { replicas })),
        other => Err(Status::internal(format!("unexpected reply {other:?}"))),
    }
}

/// The `Raft` service: peers push messages and snapshots here.
#[derive(Debug, Clone)]
pub struct RaftService {
    replica: ReplicaHandle,
    blobs: Blobs,
}

impl RaftService {
    /// Serves `replica` and its blob store to peers.
    pub fn new(replica: ReplicaHandle, blobs: Blobs) -> Self {
        RaftService { replica, blobs }
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn send(
        &self,
        req: GrpcRequest<Streaming<pb::RaftBatch>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let mut stream = req.into_inner();
        let me = self.replica.id();
        let mut introduced = false;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            if !introduced && !batch.from_address.is_empty() {
                self.replica
                    .learn_address(batch.from, batch.from_address.clone());
                introduced = true;
            }
            if batch.to != me {
                return Err(Status::invalid_argument(format!(
                    "message for replica {} reached replica {me}; check --peers addresses",
                    batch.to
                )));
            }
            for bytes in batch.messages {
                match Message::parse_from_bytes(&bytes) {
                    Ok(m) => self.replica.deliver(m),
                    Err(e) => {
                        return Err(Status::invalid_argument(format!("bad raft message: {e}")));
                    }
                }
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn copy_blob(
        &self,
        req: GrpcRequest<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        self.blobs.receive(req.into_inner()).await?;
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn has_blob(
        &self,
        req: GrpcRequest<pb::HasBlobRequest>,
    ) -> Result<Response<pb::HasBlobReply>, Status> {
        let asked = req.into_inner().sha256;
        let present = asked.iter().take(1024).map(|s| async move {
            self.blobs.touch(s).await;
            self.blobs.size(s).await.is_some()
        });
        let present = futures::future::join_all(present).await;
        Ok(Response::new(pb::HasBlobReply { present }))
    }

    type ReadBlobStream = tokio_stream::wrappers::ReceiverStream<Result<pb::BlobChunk, Status>>;

    async fn read_blob(
        &self,
        req: GrpcRequest<pb::FetchBlob>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.blobs.send(&r.sha256, r.offset).await?))
    }

    async fn snapshot(
        &self,
        req: GrpcRequest<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let mut stream = req.into_inner();
        let mut header: Option<Message> = None;
        let mut data: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if header.is_none() {
                if !chunk.from_address.is_empty() {
                    self.replica
                        .learn_address(chunk.from, chunk.from_address.clone());
                }
                let m = Message::parse_from_bytes(&chunk.message)
                    .map_err(|e| Status::invalid_argument(format!("bad snapshot header: {e}")))?;
                if chunk.total_len > 8 << 30 {
                    return Err(Status::invalid_argument("snapshot larger than 8 GiB"));
                }
                data.reserve(chunk.total_len as usize);
                header = Some(m);
            }
            data.extend_from_slice(&chunk.data);
        }
        let mut m = header.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        m.mut_snapshot().data = data.into();
        self.replica.deliver(m);
        Ok(Response::new(pb::RaftAck {}))
    }
}
