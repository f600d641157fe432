//! The `Edge` service: what gateways ask of the control plane. Any replica serves `Watch`
//! and `FetchModule` from its applied state; the leader takes gateways' sessions (liveness
//! deltas into its soft state, registrations committed before the ack), usage batches and
//! allocation-state batches. Every call needs an admin token.
//!
//! ```text
//!  gateway ─Watch(from)──────▶ changes since `from` (or a reset in pages), then one event
//!                              per move of the applied index (coalesced), never polled
//!  gateway ─Session(reports)─▶ open ─▶ report: soft state; joined ─▶ RegisterNodes (Raft)
//!          ◀──────────GatewayAck(seq) once committed; silent or closed ─▶ gateway orphaned
//!  gateway ─RecordUsage / ReportAllocations─▶ one command each, answered once applied
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use stellar_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::auth::TokenCache;
use crate::changes::{Changes, Page};
use crate::error::Error;
use crate::replica::{Query, Reply, Request};
use crate::replica_thread::ReplicaHandle;
use crate::service::{READ_TIMEOUT, WRITE_TIMEOUT, to_status};
use crate::state::MAX_NODES_PER_COMMAND;

/// A gateway that sends nothing for this long is judged dead (it reports every second).
pub const GATEWAY_SILENT: Duration = Duration::from_secs(5);
/// A watcher with nothing to learn still hears the applied index this often (its cursor).
const WATCH_PROGRESS: Duration = Duration::from_secs(1);
/// Changes are gathered this long after the applied index moves (one event for a burst).
const WATCH_COALESCE: Duration = Duration::from_millis(10);
/// Most records or updates per batch call.
pub const MAX_BATCH: usize = 10_000;
/// Module bytes per chunk.
const MODULE_CHUNK: usize = 1 << 20;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `Edge` service of one replica.
#[derive(Debug, Clone)]
pub struct EdgeService {
    replica: ReplicaHandle,
    auth: Arc<TokenCache>,
    sessions: Arc<AtomicU64>,
    closed: tokio::sync::watch::Receiver<bool>,
    blobs: crate::blob_transfer::Blobs,
    /// The receipt period's length carried in each usage command (0: the default).
    receipt_period_ms: u64,
}

impl EdgeService {
    /// Serves `replica` to gateways holding an admin token; streams end when `closed` fires.
    pub fn new(
        replica: ReplicaHandle,
        auth: Arc<TokenCache>,
        closed: tokio::sync::watch::Receiver<bool>,
        blobs: crate::blob_transfer::Blobs,
        receipt_period_ms: u64,
    ) -> Self {
        EdgeService {
            replica,
            auth,
            sessions: Arc::new(AtomicU64::new(0)),
            closed,
            blobs,
            receipt_period_ms,
        }
    }

    async fn admin<T>(&self, req: &GrpcRequest<T>, what: &str) -> Result<(), Status> {
        self.auth.caller(req.metadata()).await?.require_admin(what)
    }

    async fn write(&self, request_id: Vec<u8>, kind: pb::command::Kind) -> Result<u64, Status> {
        self.write_result(request_id, kind)
            .await
            .map(|_| self.replica.info().applied)
    }

    /// Writes a command and answers with what apply answered (once applied here).
    async fn write_result(
        &self,
        request_id: Vec<u8>,
        kind: pb::command::Kind,
    ) -> Result<pb::CommandResult, Status> {
        if request_id.len() > crate::state::MAX_REQUEST_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "request_id is {} bytes; at most {}",
                request_id.len(),
                crate::state::MAX_REQUEST_ID_BYTES
            )));
        }
        self.replica
            .write(
                Request::Command(pb::Command {
                    request_id,
                    kind: Some(kind),
                }),
                WRITE_TIMEOUT,
            )
            .await
            .map_err(to_status)
            .and_then(|r| match r {
                Reply::Applied(r) if r.error_code.is_empty() => Ok(r),
                Reply::Applied(r) => Err(to_status(
                    crate::error::ApplyError::from_code(&r.error_code, &r.error_message).into(),
                )),
                other => Err(Status::internal(format!("unexpected reply {other:?}"))),
            })
    }
}

/// Streams changes to one watcher until it goes away or the replica stops.
async fn watch(
    replica: ReplicaHandle,
    mut from: u64,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = replica.applied();
    let mut last_sent = stellar_proto::clock::now();
    loop {
        let answer = replica
            .read(Query::WatchChanges { from }, true, READ_TIMEOUT)
            .await;
        match answer {
            Ok(Reply::Changes(c)) => match *c {
                Changes::Since(ev) => {
                    let empty = ev.functions.is_empty()
                        && ev.allocations.is_empty()
                        && ev.removed_allocations.is_empty()
                        && ev.nodes.is_empty()
                        && ev.tokens.is_empty()
                        && ev.tasks.is_empty();
                    let progress = ev.applied_index > from && last_sent.elapsed() >= WATCH_PROGRESS;
                    from = from.max(ev.applied_index);
                    if !empty || progress {
                        last_sent = stellar_proto::clock::now();
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                }
                Changes::TooOld => match reset(&replica, &tx).await {
                    Some(index) => from = index,
                    None => return,
                },
            },
            Ok(other) => {
                let _ = tx
                    .send(Err(Status::internal(format!("unexpected reply {other:?}"))))
                    .await;
                return;
            }
            Err(Error::Stopped) => return,
            Err(e) => {
                tracing::debug!(error = %e, "watch read failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        tokio::select! {
            r = applied.wait_for(|a| *a > from) => if r.is_err() { return },
            _ = tokio::time::sleep(WATCH_PROGRESS) => {}
            _ = closed.wait_for(|c| *c) => return,
            _ = tx.closed() => return,
        }
        tokio::time::sleep(WATCH_COALESCE).await;
    }
}

/// Sends a reset in pages; the applied index of its first page (changes after it follow).
async fn reset(
    replica: &ReplicaHandle,
    tx: &mpsc::Sender<Result<pb::WatchEvent, Status>>,
) -> Option<u64> {
    let mut page = Some(Page::Start);
    let mut first = None;
    while let Some(p) = page {
        match replica
            .read(Query::WatchPage { page: p }, true, READ_TIMEOUT)
            .await
        {
            Ok(Reply::WatchPage(ev, next)) => {
                first.get_or_insert(ev.applied_index);
                page = next;
                tx.send(Ok(*ev)).await.ok()?;
            }
            Ok(_) | Err(Error::Stopped) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "watch reset page failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    first
}

/// The cluster's ticket key: drawn here and committed the first time a gateway needs it
/// (the first write wins, so every gateway gets the same one).
async fn ensure_ticket_key(replica: &ReplicaHandle) -> Result<Vec<u8>, Status> {
    let mut key = vec![0u8; stellar_proto::receipts::HASH_LEN];
    getrandom::fill(&mut key)
        .map_err(|e| Status::unavailable(format!("no OS randomness for the ticket key: {e}")))?;
    let cmd = pb::Command {
        request_id: Vec::new(),
        kind: Some(pb::command::Kind::TicketKey(pb::TicketKeyCmd { key })),
    };
    match replica
        .write(Request::Command(cmd), WRITE_TIMEOUT)
        .await
        .map_err(to_status)?
    {
        Reply::Applied(r) if r.error_code.is_empty() => Ok(r.ticket_key),
        Reply::Applied(r) => Err(to_status(
            crate::error::ApplyError::from_code(&r.error_code, &r.error_message).into(),
        )),
        other => Err(Status::internal(format!("unexpected reply {other:?}"))),
    }
}

/// One gateway's session: reports in order, each acknowledged once what it asked for is
/// committed; the session ends when the gateway goes quiet, hangs up, or this replica stops
/// leading.
async fn session(
    replica: ReplicaHandle,
    id: u64,
    mut inbound: Streaming<pb::GatewayReport>,
    tx: mpsc::Sender<Result<pb::GatewayAck, Status>>,
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    let mut address: Option<String> = None;
    let mut ticket_key = Vec::new();
    let end = loop {
        let next = tokio::select! {
            n = tokio::time::timeout(GATEWAY_SILENT, inbound.next()) => n,
            _ = closed.wait_for(|c| *c) => break None,
        };
        let report = match next {
            Err(_) => {
                tracing::warn!(gateway = ?address, silent_s = GATEWAY_SILENT.as_secs(), "gateway went silent; closing its session");
                break None;
            }
            Ok(None) | Ok(Some(Err(_))) => break None,
            Ok(Some(Ok(r))) => r,
        };
        if address.is_none() {
            if let Err(e) = replica.gateway_open(report.gateway.clone(), id).await {
                break Some(to_status(e));
            }
            tracing::info!(gateway = %report.gateway, session = id, "gateway session opened");
            address = Some(report.gateway.clone());
            match ensure_ticket_key(&replica).await {
                Ok(k) => ticket_key = k,
                Err(e) => break Some(e),
            }
        } else if address.as_deref() != Some(report.gateway.as_str()) {
            break Some(Status::invalid_argument(
                "a session's reports must all name the same gateway",
            ));
        }
        let seq = report.seq;
        let crate::replica::ReportReply { register, gateways } =
            match replica.gateway_report(id, report).await {
                Ok(r) => r,
                Err(e) => break Some(to_status(e)),
            };
        let mut error = String::new();
        for chunk in register.chunks(MAX_NODES_PER_COMMAND) {
            let cmd = pb::Command {
                request_id: Vec::new(),
                kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                    nodes: chunk.to_vec(),
                })),
            };
            match replica.write(Request::Command(cmd), WRITE_TIMEOUT).await {
                Ok(Reply::Applied(r)) if r.error_code.is_empty() => {}
                Ok(Reply::Applied(r)) => error = r.error_message,
                Ok(_) => {}
                Err(Error::NotLeader { .. } | Error::Stopped) => {
                    break;
                }
                Err(e) => error = e.to_string(),
            }
        }
        if !replica.info().is_leader {
            let info = replica.info();
            break Some(to_status(Error::NotLeader {
                leader: (info.leader != 0).then_some(info.leader),
                address: info.leader_address,
            }));
        }
        let ack = pb::GatewayAck {
            seq,
            silent_ms: GATEWAY_SILENT.as_millis() as u32,
            error: crate::error::clip_message(error),
            gateways,
            ticket_key: ticket_key.clone(),
        };
        if tx.send(Ok(ack)).await.is_err() {
            break None;
        }
    };
    if let Some(a) = address {
        tracing::info!(gateway = %a, session = id, "gateway session closed");
        replica.gateway_closed(a, id);
    }
    if let Some(status) = end {
        let _ = tx.send(Err(status)).await;
    }
}

#[tonic::async_trait]
impl pb::edge_server::Edge for EdgeService {
    type WatchStream = EventStream<pb::WatchEvent>;
    type SessionStream = EventStream<pb::GatewayAck>;
    type FetchModuleStream = EventStream<pb::ModuleChunk>;

    async fn watch(
        &self,
        req: GrpcRequest<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.admin(&req, "watching the cluster").await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(watch(
            self.replica.clone(),
            req.into_inner().from_index,
            tx,
            self.closed.clone(),
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn session(
        &self,
        req: GrpcRequest<Streaming<pb::GatewayReport>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.admin(&req, "a gateway session").await?;
        let info = self.replica.info();
        if !info.is_leader {
            return Err(to_status(Error::NotLeader {
                leader: (info.leader != 0).then_some(info.leader),
                address: info.leader_address,
            }));
        }
        let id = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(session(
            self.replica.clone(),
            id,
            req.into_inner(),
            tx,
            self.closed.clone(),
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn record_usage(
        &self,
        req: GrpcRequest<pb::RecordUsageRequest>,
    ) -> Result<Response<pb::RecordUsageResponse>, Status> {
        self.admin(&req, "recording usage").await?;
        let pb::RecordUsageRequest {
            records,
            refusals,
            incidents,
            request_id,
        } = req.into_inner();
        if records.len() + refusals.len() + incidents.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} usage records and refusals; at most {MAX_BATCH} per call",
                records.len() + refusals.len()
            )));
        }
        // Usage only from receipts: a record a gateway did not take from a checked receipt
        // is no usage at all.
        if let Some(r) = records.iter().find(|r| r.receipt_hash.len() != 32) {
            return Err(Status::invalid_argument(format!(
                "usage record for invocation {} has no receipt hash; the ledger takes usage \
                 only from checked receipts",
                String::from_utf8_lossy(&r.invocation_id)
            )));
        }
        if records.is_empty() && refusals.is_empty() && incidents.is_empty() {
            return Ok(Response::new(pb::RecordUsageResponse::default()));
        }
        let result = self
            .write_result(
                request_id,
                pb::command::Kind::Usage(pb::UsageCmd {
                    records,
                    unix_ms: stellar_proto::clock::unix_ms(),
                    refusals,
                    period_ms: self.receipt_period_ms,
                    incidents,
                }),
            )
            .await?;
        Ok(Response::new(pb::RecordUsageResponse {
            applied_index: self.replica.info().applied,
            verdicts: result.verdicts,
        }))
    }

    async fn report_allocations(
        &self,
        req: GrpcRequest<pb::ReportAllocationsRequest>,
    ) -> Result<Response<pb::ReportAllocationsResponse>, Status> {
        self.admin(&req, "reporting allocation states").await?;
        let pb::ReportAllocationsRequest {
            updates,
            request_id,
        } = req.into_inner();
        if updates.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} allocation updates; at most {MAX_BATCH} per call",
                updates.len()
            )));
        }
        let applied_index = self
            .write(
                request_id,
                pb::command::Kind::AllocationStates(pb::AllocationStatesCmd { updates }),
            )
            .await?;
        Ok(Response::new(pb::ReportAllocationsResponse {
            applied_index,
        }))
    }

    async fn report_tasks(
        &self,
        req: GrpcRequest<pb::ReportTasksRequest>,
    ) -> Result<Response<pb::ReportTasksResponse>, Status> {
        self.admin(&req, "reporting task attempts").await?;
        let reports = req.into_inner().reports;
        if reports.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} task reports; at most {MAX_BATCH} per call",
                reports.len()
            )));
        }
        // A result's outputs must be in the blob store on enough replicas before the log
        // names them; a report whose outputs are not is refused (the gateway uploads first).
        let need = self.blobs.copies_needed().await;
        let mut refused = Vec::with_capacity(reports.len());
        let mut taken = Vec::with_capacity(reports.len());
        for r in reports {
            let mut why = String::new();
            let outputs = r
                .result
                .as_ref()
                .map(|x| x.outputs.as_slice())
                .unwrap_or(&[]);
            let success = r.result.as_ref().is_some_and(|x| x.error_code.is_empty());
            if success && !r.lost {
                for o in outputs {
                    let copies = self.blobs.copies(&o.sha256).await;
                    if copies < need {
                        why = format!(
                            "output `{}` ({}) is stored on {copies} replica(s), {need} are needed",
                            o.name, o.sha256
                        );
                        break;
                    }
                }
            }
            if why.is_empty() {
                taken.push(r);
            }
            refused.push(why);
        }
        let applied_index = if taken.is_empty() {
            0
        } else {
            self.write(
                Vec::new(),
                pb::command::Kind::TaskReports(pb::TaskReportsCmd {
                    reports: taken,
                    unix_ms: stellar_proto::clock::unix_ms(),
                }),
            )
            .await?
        };
        Ok(Response::new(pb::ReportTasksResponse {
            applied_index,
            refused,
        }))
    }

    type FetchBlobStream = tokio_stream::wrappers::ReceiverStream<Result<pb::BlobChunk, Status>>;

    async fn fetch_blob(
        &self,
        req: GrpcRequest<pb::FetchBlob>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        self.admin(&req, "fetching blobs").await?;
        let r = req.into_inner();
        self.blobs.ensure_local(&r.sha256).await?;
        Ok(Response::new(self.blobs.send(&r.sha256, r.offset).await?))
    }

    async fn fetch_module(
        &self,
        req: GrpcRequest<pb::FetchModule>,
    ) -> Result<Response<Self::FetchModuleStream>, Status> {
        self.admin(&req, "fetching modules").await?;
        let sha = req.into_inner().sha256;
        let key: [u8; 32] = hex::decode(&sha)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "{} is not a sha256 in hex",
                    stellar_proto::text::shown(&sha)
                ))
            })?;
        let bytes = match self
            .replica
            .read(Query::Module { sha256: key }, true, READ_TIMEOUT)
            .await
            .map_err(to_status)?
        {
            Reply::Module(Some(b)) => b,
            _ => {
                return Err(Status::not_found(format!(
                    "module {sha} is not stored (its function was deleted or redeployed)"
                )));
            }
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let total = bytes.len();
            let mut offset = 0;
            loop {
                let end = (offset + MODULE_CHUNK).min(total);
                let chunk = pb::ModuleChunk {
                    sha256: sha.clone(),
                    offset: offset as u64,
                    data: bytes[offset..end].to_vec(),
                    last: end == total,
                    error: String::new(),
                };
                if tx.send(Ok(chunk)).await.is_err() || end == total {
                    return;
                }
                offset = end;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
