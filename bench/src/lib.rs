//! failback bench: the local replication demo and the harness that runs the real roles as
//! processes (shared with the end-to-end tests).

pub mod apply;
pub mod churn;
pub mod cluster;
pub mod demo;
pub mod ingest;
pub mod packet;
pub mod peers;
pub mod plot;
pub mod roles;
pub mod rpo;
pub mod run;
pub mod scale;
pub mod streams;
pub mod tls;
pub mod usage;
pub mod verify;
pub mod wan;
pub mod workload;
