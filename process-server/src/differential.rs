//! `Differential.DiskHashes` for agents: relays each page request to the master target
//! (docs/internals.md, "Differential sync").
//!
//! Each hop authenticates on its own: the agent proves the passphrase to this server (with a
//! challenge from `ProcessServer.Challenge`) and gets this server's proof back; this server
//! proves it to the master target with a challenge of its own and checks the master target's
//! proof before a byte of the page is passed on. The request carries `after_seq` = every
//! batch this server has accepted for the disk, so the master target hashes only once they
//! are applied: no batch still in the cache can change a hashed chunk afterwards.

use std::sync::Arc;

use protocol::client::{begin_auth, connect, refusal_from_status};
use protocol::disk::check_disk_info;
use protocol::error::{Code, Refusal};
use protocol::pb::differential_server::Differential;
use protocol::pb::{DiskHashes, DiskHashesRequest};
use protocol::transport::{differential_client, master_target_client};
use tonic::{Request, Response, Status};

use crate::forward::ForwardConfig;
use crate::server::Ctx;

/// The relay: the server's context, and the forwarder's settings to reach the master target.
#[derive(Debug)]
pub struct Relay {
    pub ctx: Arc<Ctx>,
    pub upstream: ForwardConfig,
}

impl Relay {
    async fn relay(&self, mut r: DiskHashesRequest) -> Result<DiskHashes, Refusal> {
        let proof = self.ctx.auth.verify(r.auth.as_ref())?;
        let disk = r
            .disk
            .as_ref()
            .ok_or_else(|| Refusal::new(Code::BadRequest, "disk hashes request without a disk"))?;
        check_disk_info(disk)?;
        r.after_seq = self.ctx.disks.get(&disk.disk_id).map_or(0, |s| s.appended);

        let up = &self.upstream;
        let channel = connect(&up.url, &up.tuning, &up.tls).await?;
        let pending = begin_auth(&mut master_target_client(channel.clone()), &up.auth).await?;
        r.auth = Some(pending.auth.clone());
        let mut reply = differential_client(channel)
            .disk_hashes(r)
            .await
            .map_err(|s| refusal_from_status(&s))?
            .into_inner();
        up.auth.verify_server(&pending, &reply.server_proof)?;
        reply.server_proof = proof.into();
        Ok(reply)
    }
}

#[tonic::async_trait]
impl Differential for Relay {
    async fn disk_hashes(
        &self,
        req: Request<DiskHashesRequest>,
    ) -> Result<Response<DiskHashes>, Status> {
        match self.relay(req.into_inner()).await {
            Ok(reply) => Ok(Response::new(reply)),
            Err(r) => {
                tracing::warn!("disk hashes request refused: {r}");
                Err(r.to_status())
            }
        }
    }
}
