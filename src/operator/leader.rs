//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager), so that of several
//! operator replicas only one reconciles: the others wait as standbys and take over when the
//! holder stops renewing (it died) or releases the Lease (SIGTERM).

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// `--leader-elect` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    /// Name of the Lease (the chart uses the operator's full name).
    pub lease_name: String,
    /// Namespace of the Lease (the chart passes the pod's namespace).
    pub namespace: String,
    /// Holder identity written into the Lease (the pod name).
    pub identity: String,
    /// How long a holder that stopped renewing blocks the others.
    pub lease_duration: Duration,
}

/// Shortest lease the operator accepts: the renewal interval is a third of it.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

impl LeaderElection {
    /// Renewal margin: the holder renews when this much of the lease is left (a third), so
    /// two renewals may fail before a standby can take the Lease.
    fn grace_secs(&self) -> u64 {
        (self.lease_duration.as_secs() / 3).max(1)
    }
}

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease is too short for a renewal margin.
    #[error("--lease-duration-secs must be at least {min} (got {0})", min = MIN_LEASE.as_secs())]
    LeaseTooShort(u64),
    /// The Lease could not be read or created (RBAC, API server).
    #[error("leader-election Lease: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// The election task stopped before this process became the leader.
    #[error("the leader-election task ended before the Lease was acquired")]
    Ended,
}

/// A running election: a background task keeps trying to hold (and then renews) the Lease.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

impl Leadership {
    /// Joins the election (creating the Lease if it does not exist yet).
    pub async fn join(client: Client, cfg: &LeaderElection) -> Result<Self, LeaderError> {
        let secs = cfg.lease_duration.as_secs();
        if cfg.lease_duration < MIN_LEASE {
            return Err(LeaderError::LeaseTooShort(secs));
        }
        let params = LeaseParams::new(cfg.identity.clone(), secs, cfg.grace_secs());
        let manager = LeaseManagerBuilder::new(client, cfg.lease_name.clone())
            .with_namespace(cfg.namespace.clone())
            .with_parameters(params)
            .build()
            .await?;
        let (state, task) = manager.watch().await;
        Ok(Self { state, task })
    }

    /// Resolves once this process holds the Lease (at once if it already does).
    pub async fn acquired(&mut self) -> Result<(), LeaderError> {
        self.state.wait_for(|leader| *leader).await.map(|_| ()).map_err(|_| LeaderError::Ended)
    }

    /// Resolves when the Lease is lost (another holder, or the election task failed).
    pub async fn lost(&mut self) {
        let _ = self.state.wait_for(|leader| !*leader).await;
    }

    /// Stops the election and releases the Lease if held, so a standby takes over at once.
    pub async fn release(self) {
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("leader-election Lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the leader-election Lease failed"),
            Err(e) => tracing::warn!(error = %e, "leader-election task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(secs: u64) -> LeaderElection {
        LeaderElection {
            lease_name: "l".into(),
            namespace: "n".into(),
            identity: "i".into(),
            lease_duration: Duration::from_secs(secs),
        }
    }

    #[test]
    fn renewal_margin_is_a_third_and_below_the_duration() {
        assert_eq!(cfg(15).grace_secs(), 5);
        assert_eq!(cfg(3).grace_secs(), 1);
        assert_eq!(cfg(4).grace_secs(), 1);
        for secs in 3..100 {
            assert!(cfg(secs).grace_secs() < secs);
        }
    }
}
