//! The agent-facing gRPC service: one bidirectional `Session` stream per
//! connected vehicle.
//!
//! The handshake is checked here (protocol version, enrolled node, matching
//! credential); everything after it is handed to the core.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_message::Kind as CoordinatorKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::core::Core;
use crate::limits;
use crate::nodes::NodeSession;
use crate::secrets;
use crate::served::ServedModels;
use crate::store::Store;

pub struct AgentService {
    pub core: Arc<Core>,
    pub store: Store,
    pub models: Arc<ServedModels>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;

fn refusal(code: proto::RefusalCode, reason: String) -> OutboundStream {
    let message = proto::CoordinatorMessage {
        kind: Some(CoordinatorKind::Refusal(proto::Refusal {
            code: code as i32,
            reason,
            protocol_version: proto::PROTOCOL_VERSION,
        })),
    };
    Box::pin(futures::stream::once(async move { Ok(message) }))
}

impl AgentService {
    /// Checks a `Hello`; `Err` carries the refusal to send back.
    async fn check_hello(&self, hello: &proto::Hello) -> Result<(), (proto::RefusalCode, String)> {
        if hello.protocol_version != proto::PROTOCOL_VERSION {
            return Err((
                proto::RefusalCode::ProtocolVersion,
                format!(
                    "agent speaks protocol version {}, this coordinator speaks {}",
                    hello.protocol_version,
                    proto::PROTOCOL_VERSION
                ),
            ));
        }
        let stored = match self.store.node_credential_hash(&hello.node_id).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(%error, node_id = %hello.node_id, "look up node credential");
                return Err((
                    proto::RefusalCode::Unspecified,
                    "coordinator storage error; retry later".into(),
                ));
            }
        };
        let Some(stored) = stored else {
            return Err((
                proto::RefusalCode::UnknownNode,
                format!(
                    "node {:?} is not enrolled; enrol it with 'fleetgrid nodes add'",
                    hello.node_id
                ),
            ));
        };
        if !secrets::hashes_equal(&stored, &secrets::hash(&hello.credential)) {
            return Err((
                proto::RefusalCode::BadCredential,
                "the node's credential is wrong".into(),
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl proto::coordinator_server::Coordinator for AgentService {
    type SessionStream = OutboundStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(limits::HELLO_TIMEOUT, inbound.message()).await;
        let hello = match first {
            Ok(Ok(Some(proto::AgentMessage {
                kind: Some(AgentKind::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => {
                self.core
                    .metrics
                    .nodes_refused
                    .fetch_add(1, crate::core::ORDER);
                return Ok(Response::new(refusal(
                    proto::RefusalCode::BadHello,
                    "the first message must be Hello".into(),
                )));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within the time limit")),
        };
        if let Err((code, reason)) = self.check_hello(&hello).await {
            tracing::warn!(node_id = %hello.node_id, ?code, %reason, "refusing agent");
            self.core
                .metrics
                .nodes_refused
                .fetch_add(1, crate::core::ORDER);
            return Ok(Response::new(refusal(code, reason)));
        }
        // The owner's stored policy applies from the first moment; a change
        // made while this loads reaches the scheduler through the change feed.
        let policy = match self.store.node_policy(&hello.node_id).await {
            Ok(policy) => policy,
            Err(error) => {
                tracing::error!(%error, node_id = %hello.node_id, "load owner policy");
                return Ok(Response::new(refusal(
                    proto::RefusalCode::Unspecified,
                    "coordinator storage error; retry later".into(),
                )));
            }
        };
        let (outbound, receiver) = mpsc::channel(limits::NODE_OUTBOUND_CAPACITY);
        let welcome = proto::CoordinatorMessage {
            kind: Some(CoordinatorKind::Welcome(proto::Welcome {
                protocol_version: proto::PROTOCOL_VERSION,
                heartbeat_interval_ms: duration_ms(self.heartbeat_interval),
                heartbeat_timeout_ms: duration_ms(self.heartbeat_timeout),
            })),
        };
        if outbound.try_send(welcome).is_err() {
            return Err(Status::internal("could not queue welcome"));
        }
        let session =
            self.core
                .node_connected(&hello.node_id, &hello, outbound, &self.models, policy);
        tracing::info!(node_id = %hello.node_id, models = hello.models.len(), "node connected");
        let store = self.store.clone();
        let name = hello.node_id.clone();
        tokio::spawn(async move {
            if let Err(error) = store
                .touch_node(&name, crate::core::now_ms().0 as i64)
                .await
            {
                tracing::warn!(%error, node_id = %name, "record node last seen");
            }
        });
        tokio::spawn(read_agent(
            Arc::clone(&self.core),
            session,
            inbound,
            hello.node_id,
        ));
        let stream = ReceiverStream::new(receiver).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn duration_ms(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Reads one agent's messages until its stream ends, then reports it lost.
async fn read_agent(
    core: Arc<Core>,
    session: NodeSession,
    mut inbound: Streaming<proto::AgentMessage>,
    name: String,
) {
    loop {
        match inbound.message().await {
            Ok(Some(message)) => match message.kind {
                Some(AgentKind::Heartbeat(heartbeat)) => core.heartbeat(session, &heartbeat),
                Some(AgentKind::Tokens(batch)) => core.node_tokens(session, batch),
                Some(AgentKind::Done(done)) => core.node_done(session, done),
                Some(AgentKind::Failed(failed)) => core.node_failed(session, failed),
                Some(AgentKind::Checkpoint(piece)) => core.node_checkpoint(session, piece),
                Some(AgentKind::Hello(_)) | None => {
                    core.metrics
                        .node_protocol_violations
                        .fetch_add(1, crate::core::ORDER);
                    tracing::warn!(node_id = %name, "unexpected message from agent");
                }
            },
            Ok(None) => {
                tracing::info!(node_id = %name, "agent closed its stream");
                break;
            }
            Err(status) => {
                tracing::warn!(node_id = %name, %status, "agent stream broke");
                break;
            }
        }
    }
    core.node_lost(session);
}
