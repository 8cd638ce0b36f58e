//! A hook the destination calls once a migrated container runs and is committed (used by
//! `ferry serve --containerd` to register the container as a containerd task).

use std::path::Path;
use std::sync::Arc;

type CommitFn = dyn Fn(&str, &Path, i32) -> Result<(), String> + Send + Sync;

/// Called with the container id, its bundle and the restored pid after `Committed`. An
/// error is logged: the migration has committed and the container runs under runc anyway.
#[derive(Clone)]
pub struct CommitHook(Arc<CommitFn>);

impl CommitHook {
    pub fn new(f: impl Fn(&str, &Path, i32) -> Result<(), String> + Send + Sync + 'static) -> Self {
        CommitHook(Arc::new(f))
    }

    pub fn call(&self, id: &str, bundle: &Path, pid: i32) {
        if let Err(e) = (self.0)(id, bundle, pid) {
            tracing::warn!(id, "after the migration: {e}");
        }
    }
}

impl std::fmt::Debug for CommitHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitHook")
    }
}
