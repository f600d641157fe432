//! A hostile world for the worker's integration tests: a real control plane (in-process,
//! real gRPC on loopback) with real workers, and a modified worker (`Rogue`) that speaks
//! the Agent protocol by hand with a real identity.
#![allow(dead_code)] // each test crate uses its own part
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::time::Duration;

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use stellar_proto::v1::agent_client::AgentClient;
use stellar_worker::Identity;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::common::{Plane, TOKEN, free_port, until, worker_config};

/// A plane with an admin client that acts for tenant `acme`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: String,
    plane: Option<Plane>,
    pub admin: ClusterClient,
    workers: Vec<(
        oneshot::Sender<()>,
        tokio::task::JoinHandle<stellar_worker::Result<()>>,
    )>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let plane = Plane::start(&dir.path().join("plane"), &addr);
        let admin = ClusterClient::new(std::slice::from_ref(&addr))
            .unwrap()
            .with_admin_token_from(vec![dir.path().join("plane")]);
        admin.create_tenant("acme").await.expect("tenant");
        Cluster {
            dir,
            addr,
            plane: Some(plane),
            admin,
            workers: Vec::new(),
        }
    }

    /// Starts a real worker labelled `tier=home`; its node id.
    pub async fn worker(&mut self, name: &str) -> u64 {
        let dir = self.dir.path().join(name);
        let node = Identity::load_or_create(&dir).unwrap().node();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(stellar_worker::run(
            worker_config(&dir, &self.addr, TOKEN),
            async move {
                let _ = stopped.await;
            },
        ));
        self.workers.push((stop, task));
        let admin = self.admin.clone();
        until("the worker to register", || async {
            admin.nodes().await.ok()?.into_iter().find(|n| n.id == node)
        })
        .await;
        node
    }

    pub async fn stop(mut self) {
        for (stop, task) in self.workers.drain(..) {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        if let Some(p) = self.plane.take() {
            p.stop().await;
        }
    }
}

pub fn limits(timeout_ms: u32) -> pb::FunctionLimits {
    pb::FunctionLimits {
        cpu_millis: 100,
        memory_mib: 64,
        timeout_ms,
        ..Default::default()
    }
}

/// A deploy of `module` as `acme/name` on nodes labelled `label=yes`.
pub fn deploy_on(
    name: &str,
    module: Vec<u8>,
    label: &str,
    limits: pb::FunctionLimits,
) -> pb::DeployRequest {
    pb::DeployRequest {
        name: name.into(),
        module,
        limits: Some(limits),
        replicas: 1,
        tenant: "acme".into(),
        constraints: vec![pb::LabelConstraint {
            key: label.into(),
            value: String::new(),
            absent: false,
        }],
        ..Default::default()
    }
}

/// `acme/name` as the committed state has it (leader read).
pub async fn function(client: &ClusterClient, name: &str) -> Option<pb::FunctionStatus> {
    let name = name.to_string();
    client
        .call(|mut cl| {
            let name = name.clone();
            async move {
                cl.get_function(pb::GetFunctionRequest {
                    tenant: "acme".into(),
                    name,
                    read: None,
                })
                .await
            }
        })
        .await
        .ok()
}

pub fn call(name: &str, args: &[&str]) -> pb::InvokeRequest {
    pb::InvokeRequest {
        tenant: "acme".into(),
        function: name.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// A modified worker: a real identity speaking the Agent protocol by hand.
pub struct Rogue {
    pub tx: mpsc::Sender<pb::WorkerMessage>,
    pub inbound: tonic::Streaming<pb::ControlMessage>,
}

impl Rogue {
    pub async fn attach(addr: &str, dir: &Path) -> Rogue {
        let identity = Identity::load_or_create(dir).unwrap();
        let mut client = AgentClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let nonce = client
            .challenge(pb::ChallengeRequest {})
            .await
            .unwrap()
            .into_inner()
            .nonce;
        let (tx, rx) = mpsc::channel(64);
        tx.send(msg(pb::worker_message::Kind::Register(registration(
            &identity, nonce,
        ))))
        .await
        .unwrap();
        let mut inbound = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        match inbound.message().await.unwrap().and_then(|m| m.kind) {
            Some(pb::control_message::Kind::Registered(_)) => {}
            other => panic!("rogue not registered: {other:?}"),
        }
        Rogue { tx, inbound }
    }

    /// The next assignment or invocation (acks and the like skipped); None when the stream
    /// ends.
    pub async fn next(&mut self) -> Option<pb::control_message::Kind> {
        use pb::control_message::Kind;
        loop {
            match self.inbound.message().await {
                Ok(Some(pb::ControlMessage {
                    kind: Some(k @ (Kind::Assignment(_) | Kind::Invocation(_))),
                })) => return Some(k),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    pub async fn send(&self, kind: pb::worker_message::Kind) {
        let _ = self.tx.send(msg(kind)).await;
    }

    /// Claims its assignments running until an invocation arrives; that invocation.
    pub async fn serve_until_invoked(&mut self) -> Option<pb::Invocation> {
        loop {
            match self.next().await? {
                pb::control_message::Kind::Assignment(a) if a.start => {
                    self.send(pb::worker_message::Kind::Allocation(pb::AllocationUpdate {
                        allocation: a.allocation,
                        state: pb::AllocationState::Running as i32,
                        message: String::new(),
                    }))
                    .await;
                }
                pb::control_message::Kind::Invocation(i) => return Some(i),
                _ => {}
            }
        }
    }
}

pub fn msg(kind: pb::worker_message::Kind) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

/// A registration of the node `identity` holds, labelled `rogue=yes`, answering `nonce`.
pub fn registration(identity: &Identity, nonce: Vec<u8>) -> pb::Register {
    pb::Register {
        node: identity.node(),
        public_key: identity.public_key().to_vec(),
        attributes: Some(pb::NodeAttributes {
            region: "cn-east".into(),
            zone: "rogue".into(),
            arch: "x86_64".into(),
            runtimes: vec!["wasm".into()],
            capacity: Some(pb::Resources {
                cpu_millis: 4000,
                memory_mib: 4096,
                disk_mib: 0,
            }),
            labels: vec![pb::Label {
                key: "rogue".into(),
                value: "yes".into(),
            }],
            ..Default::default()
        }),
        signature: identity.sign_registration(TOKEN, &nonce).to_vec(),
        join_token: TOKEN.into(),
        nonce,
    }
}

/// Attaches with `reg` as the first message; the gateway's first answer.
pub async fn attach_with(
    addr: &str,
    reg: pb::Register,
) -> Result<pb::control_message::Kind, Status> {
    let mut client = AgentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg(pb::worker_message::Kind::Register(reg)))
        .await
        .unwrap();
    let mut inbound = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = inbound.message().await?.and_then(|m| m.kind);
    first.ok_or_else(|| Status::aborted("the stream ended"))
}
