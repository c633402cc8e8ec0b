//! The VM process's run state (QEMU's `RunState` names) and how the process ends.

use serde::Serialize;

/// The guest's run state, with QEMU's names (`qapi/run-state.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// The guest runs.
    Running,
    /// Paused by `stop`.
    Paused,
    /// A destination waiting for (or receiving) a migration; no guest runs yet.
    Inmigrate,
    /// The guest migrated away: it runs on the destination, this copy stays paused.
    Postmigrate,
    /// The guest powered off, or `quit` was given.
    Shutdown,
    /// Switchover: the source is paused while the last pages and the device state go out.
    FinishMigrate,
    /// The guest crashed (a vCPU failed).
    InternalError,
}

impl RunState {
    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Inmigrate => "inmigrate",
            RunState::Postmigrate => "postmigrate",
            RunState::Shutdown => "shutdown",
            RunState::FinishMigrate => "finish-migrate",
            RunState::InternalError => "internal-error",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a VM process ends, and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessExit {
    /// `quit` (exit 0).
    Quit,
    /// The guest powered off with this status (the process exits with it).
    GuestPoweredOff(u8),
    /// The guest crashed (exit 1).
    GuestCrashed(String),
    /// The guest migrated away and the process was told to end then (exit 0).
    MigratedAway,
    /// The process was told to end after one migration attempt, which did not complete
    /// (exit 1).
    MigrationFailed(String),
    /// The owner ended the process (a `--duration` passed; exit 0).
    Finished,
}

impl ProcessExit {
    /// The process exit code.
    pub fn code(&self) -> i32 {
        match self {
            ProcessExit::Quit | ProcessExit::MigratedAway | ProcessExit::Finished => 0,
            ProcessExit::GuestPoweredOff(s) => i32::from(*s),
            ProcessExit::GuestCrashed(_) | ProcessExit::MigrationFailed(_) => 1,
        }
    }
}

impl std::fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessExit::Quit => f.write_str("quit by the monitor"),
            ProcessExit::GuestPoweredOff(s) => write!(f, "the guest powered off with status {s}"),
            ProcessExit::GuestCrashed(why) => write!(f, "the guest crashed: {why}"),
            ProcessExit::MigratedAway => f.write_str("the guest migrated away"),
            ProcessExit::MigrationFailed(why) => write!(f, "the migration did not complete: {why}"),
            ProcessExit::Finished => f.write_str("the run time is over"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_serialize_with_qemus_names() {
        for s in [
            RunState::Running,
            RunState::Paused,
            RunState::Inmigrate,
            RunState::Postmigrate,
            RunState::Shutdown,
            RunState::FinishMigrate,
            RunState::InternalError,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert_eq!(RunState::FinishMigrate.to_string(), "finish-migrate");
    }

    #[test]
    fn exit_codes_are_zero_only_for_a_clean_end() {
        assert_eq!(ProcessExit::Quit.code(), 0);
        assert_eq!(ProcessExit::MigratedAway.code(), 0);
        assert_eq!(ProcessExit::Finished.code(), 0);
        assert_eq!(ProcessExit::GuestPoweredOff(7).code(), 7);
        assert_eq!(ProcessExit::GuestCrashed("x".into()).code(), 1);
        assert_eq!(ProcessExit::MigrationFailed("x".into()).code(), 1);
    }
}
