//! Event replay: scale consumers to zero, wait until none runs, reset the group's committed
//! offsets, restore scaling.
//!
//! [`next_step`] is the whole state machine as a pure function of the spec, the persisted status
//! and what was observed; the driver in `reconcile.rs` executes one step per reconcile and writes
//! the resulting state into `status.lastReplay`. Because the state lives only in the status and
//! every step is idempotent (scale to 0, reset to the same target, re-apply), a controller that
//! restarts anywhere resumes from the persisted step.

use chrono::{DateTime, Utc};

use super::crd::{ReplayPhase, ReplaySpec, ReplayStatus};
use crate::kafka::admin::ResetTarget;

/// What the driver has looked at before asking for the next step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observations {
    /// Consumer pods still present (any phase but Succeeded/Failed); `None` = not counted yet.
    pub running_pods: Option<u32>,
}

/// The next thing to do for the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No replay requested, or the requested one is final: reconcile normally.
    Idle,
    /// Remove the autoscaler and set the Deployment to 0 replicas; then `WaitingForPodsGone`.
    ScaleDown {
        /// Replay id being started or continued.
        id: String,
        /// True when this id was not in the status yet (record `started`, emit an Event).
        new: bool,
    },
    /// The driver must count the consumer pods and ask again.
    CountPods,
    /// Pods are still stopping: stay in `WaitingForPodsGone`.
    WaitForPods {
        /// How many are left.
        running: u32,
    },
    /// No consumer runs any more: move to `ResettingOffsets`.
    PodsGone,
    /// Reset the group's offsets; on success move to `Restoring`, otherwise stay and retry.
    ResetOffsets {
        /// Where the group re-reads from.
        target: ResetTarget,
    },
    /// Re-apply the normal Deployment and autoscaler; then `Done`.
    Restore,
    /// Give up with this message (`Failed`); normal reconciling restores the consumers.
    Fail {
        /// Replay id that failed.
        id: String,
        /// Why.
        message: String,
    },
}

/// Parses `spec.replay.from`: `earliest` or an RFC 3339 timestamp.
pub fn parse_target(from: &str) -> Result<ResetTarget, String> {
    if from.trim().eq_ignore_ascii_case("earliest") {
        return Ok(ResetTarget::Earliest);
    }
    DateTime::parse_from_rfc3339(from.trim())
        .map(|t| ResetTarget::Time(t.with_timezone(&Utc)))
        .map_err(|e| {
            format!("replay.from {from:?} is neither \"earliest\" nor an RFC 3339 time: {e}")
        })
}

/// The replay state machine.
pub fn next_step(
    spec: Option<&ReplaySpec>,
    last: Option<&ReplayStatus>,
    obs: &Observations,
) -> Action {
    let Some(spec) = spec else {
        return match last {
            Some(l) if !l.state.is_final() => Action::Fail {
                id: l.id.clone(),
                message: "spec.replay was removed before the replay finished".into(),
            },
            _ => Action::Idle,
        };
    };
    let target = parse_target(&spec.from);
    let current = last.filter(|l| l.id == spec.id);
    let Some(current) = current else {
        return match target {
            Ok(_) => Action::ScaleDown { id: spec.id.clone(), new: true },
            Err(message) => Action::Fail { id: spec.id.clone(), message },
        };
    };
    match current.state {
        ReplayPhase::Done | ReplayPhase::Failed => Action::Idle,
        ReplayPhase::ScalingDown => Action::ScaleDown { id: spec.id.clone(), new: false },
        ReplayPhase::WaitingForPodsGone => match obs.running_pods {
            None => Action::CountPods,
            Some(0) => Action::PodsGone,
            Some(running) => Action::WaitForPods { running },
        },
        ReplayPhase::ResettingOffsets => match target {
            Ok(target) => Action::ResetOffsets { target },
            Err(message) => Action::Fail { id: spec.id.clone(), message },
        },
        ReplayPhase::Restoring => Action::Restore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, from: &str) -> ReplaySpec {
        ReplaySpec { id: id.into(), from: from.into() }
    }

    fn status(id: &str, state: ReplayPhase) -> ReplayStatus {
        ReplayStatus {
            id: id.into(),
            state,
            started: Some("2026-11-26T10:00:00Z".into()),
            finished: None,
            message: None,
        }
    }

    const NONE: Observations = Observations { running_pods: None };

    #[test]
    fn no_replay_is_idle() {
        assert_eq!(next_step(None, None, &NONE), Action::Idle);
        let done = status("r1", ReplayPhase::Done);
        assert_eq!(next_step(None, Some(&done), &NONE), Action::Idle);
    }

    #[test]
    fn walks_every_step_in_order() {
        let s = spec("r1", "2026-11-26T09:00:00Z");
        let start = next_step(Some(&s), None, &NONE);
        assert_eq!(start, Action::ScaleDown { id: "r1".into(), new: true });

        let waiting = status("r1", ReplayPhase::WaitingForPodsGone);
        assert_eq!(next_step(Some(&s), Some(&waiting), &NONE), Action::CountPods);
        let two = Observations { running_pods: Some(2) };
        assert_eq!(next_step(Some(&s), Some(&waiting), &two), Action::WaitForPods { running: 2 });
        let zero = Observations { running_pods: Some(0) };
        assert_eq!(next_step(Some(&s), Some(&waiting), &zero), Action::PodsGone);

        let resetting = status("r1", ReplayPhase::ResettingOffsets);
        let t = DateTime::parse_from_rfc3339("2026-11-26T09:00:00Z")
            .expect("literal")
            .with_timezone(&Utc);
        assert_eq!(
            next_step(Some(&s), Some(&resetting), &NONE),
            Action::ResetOffsets { target: ResetTarget::Time(t) }
        );
        let restoring = status("r1", ReplayPhase::Restoring);
        assert_eq!(next_step(Some(&s), Some(&restoring), &NONE), Action::Restore);
        let done = status("r1", ReplayPhase::Done);
        assert_eq!(next_step(Some(&s), Some(&done), &NONE), Action::Idle);
    }

    #[test]
    fn interrupted_scale_down_is_repeated_not_restarted() {
        let s = spec("r1", "earliest");
        let st = status("r1", ReplayPhase::ScalingDown);
        assert_eq!(
            next_step(Some(&s), Some(&st), &NONE),
            Action::ScaleDown { id: "r1".into(), new: false }
        );
    }

    #[test]
    fn a_new_id_starts_over_even_mid_replay() {
        let s = spec("r2", "earliest");
        let st = status("r1", ReplayPhase::ResettingOffsets);
        assert_eq!(
            next_step(Some(&s), Some(&st), &NONE),
            Action::ScaleDown { id: "r2".into(), new: true }
        );
        let failed = status("r1", ReplayPhase::Failed);
        assert_eq!(
            next_step(Some(&s), Some(&failed), &NONE),
            Action::ScaleDown { id: "r2".into(), new: true }
        );
    }

    #[test]
    fn bad_from_fails_before_touching_anything() {
        let s = spec("r1", "yesterday");
        match next_step(Some(&s), None, &NONE) {
            Action::Fail { id, message } => {
                assert_eq!(id, "r1");
                assert!(message.contains("yesterday"), "{message}");
            }
            other => panic!("expected Fail, got {other:?}"),
        }
        assert_eq!(parse_target(" Earliest "), Ok(ResetTarget::Earliest));
    }

    #[test]
    fn removing_the_request_mid_replay_fails_it() {
        let st = status("r1", ReplayPhase::WaitingForPodsGone);
        assert!(matches!(next_step(None, Some(&st), &NONE), Action::Fail { .. }));
    }
}
