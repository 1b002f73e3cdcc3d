//! Client-side connection set-up shared by every caller of a failback server: connect with
//! the WAN tuning, take a challenge, and build the `Auth` for the first message.

use tonic::transport::Channel;

use crate::auth::{ClientAuth, PendingAuth};
use crate::error::{Code, Refusal};
use crate::pb::master_target_client::MasterTargetClient;
use crate::pb::process_server_client::ProcessServerClient;
use crate::pb::{ChallengeRequest, StatusReply, StatusRequest};
use crate::transport::{TlsFiles, WanTuning, master_target_client, process_server_client};

/// Connects to `url`; a refused or unreachable server is a `Code::Unavailable` refusal that
/// names the URL.
pub async fn connect(url: &str, tuning: &WanTuning, tls: &TlsFiles) -> Result<Channel, Refusal> {
    let endpoint = tuning
        .endpoint(url, tls)
        .map_err(|e| Refusal::new(Code::BadRequest, e.to_string()))?;
    endpoint.connect().await.map_err(|e| {
        Refusal::new(
            Code::Unavailable,
            format!("cannot connect to {url}: {}", error_chain(&e)),
        )
    })
}

/// `e` and its sources, joined by ": ", so that "connection refused" is not hidden.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The refusal carried by a gRPC status (its message is already "error <code>: ...").
pub fn refusal_from_status(s: &tonic::Status) -> Refusal {
    let code = match s.code() {
        tonic::Code::Unauthenticated => Code::AuthFailed,
        tonic::Code::Unavailable | tonic::Code::Cancelled => Code::Unavailable,
        tonic::Code::ResourceExhausted => Code::NoSpace,
        tonic::Code::NotFound => Code::UnknownDisk,
        tonic::Code::InvalidArgument => Code::BadRequest,
        _ => Code::Internal,
    };
    Refusal::new(code, s.message().to_string())
}

/// The two services share `Challenge` and `Status`; this lets one helper serve both.
pub trait Handshake {
    fn challenge(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, tonic::Status>> + Send;
    fn status(
        &mut self,
        req: StatusRequest,
    ) -> impl std::future::Future<Output = Result<StatusReply, tonic::Status>> + Send;
}

impl Handshake for ProcessServerClient<Channel> {
    async fn challenge(&mut self) -> Result<Vec<u8>, tonic::Status> {
        Ok(ProcessServerClient::challenge(self, ChallengeRequest {})
            .await?
            .into_inner()
            .server_nonce
            .to_vec())
    }
    async fn status(&mut self, req: StatusRequest) -> Result<StatusReply, tonic::Status> {
        Ok(ProcessServerClient::status(self, req).await?.into_inner())
    }
}

impl Handshake for MasterTargetClient<Channel> {
    async fn challenge(&mut self) -> Result<Vec<u8>, tonic::Status> {
        Ok(MasterTargetClient::challenge(self, ChallengeRequest {})
            .await?
            .into_inner()
            .server_nonce
            .to_vec())
    }
    async fn status(&mut self, req: StatusRequest) -> Result<StatusReply, tonic::Status> {
        Ok(MasterTargetClient::status(self, req).await?.into_inner())
    }
}

/// Takes a challenge and answers it: the `Auth` to put into the first message.
pub async fn begin_auth<C: Handshake>(
    client: &mut C,
    auth: &ClientAuth,
) -> Result<PendingAuth, Refusal> {
    let nonce = client
        .challenge()
        .await
        .map_err(|s| refusal_from_status(&s))?;
    Ok(auth.respond(&nonce))
}

/// One authenticated `Status` call; the server's proof is checked.
pub async fn status<C: Handshake>(
    client: &mut C,
    auth: &ClientAuth,
) -> Result<StatusReply, Refusal> {
    let pending = begin_auth(client, auth).await?;
    let reply = client
        .status(StatusRequest {
            auth: Some(pending.auth.clone()),
        })
        .await
        .map_err(|s| refusal_from_status(&s))?;
    auth.verify_server(&pending, &reply.server_proof)?;
    Ok(reply)
}

/// Connects to a process server and returns a client with the message limits set.
pub async fn process_server(
    url: &str,
    tuning: &WanTuning,
    tls: &TlsFiles,
) -> Result<ProcessServerClient<Channel>, Refusal> {
    Ok(process_server_client(connect(url, tuning, tls).await?))
}

/// Connects to a master target and returns a client with the message limits set.
pub async fn master_target(
    url: &str,
    tuning: &WanTuning,
    tls: &TlsFiles,
) -> Result<MasterTargetClient<Channel>, Refusal> {
    Ok(master_target_client(connect(url, tuning, tls).await?))
}
