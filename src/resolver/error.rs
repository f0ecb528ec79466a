//! The resolver's error: a statement timeout is told apart from other
//! database failures by its type, because it shrinks the next batches
//! (see [`BatchSize`](super::BatchSize)).

use std::error::Error;
use std::fmt;

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

/// Why a resolution step or scan failed.
#[derive(Debug)]
pub enum ResolveError {
    /// A statement was cancelled by `statement_timeout`.
    StatementTimeout(tokio_postgres::Error),
    /// An auction lost this many compare-and-sets in a row; it is left to
    /// the next round.
    Conflicts(u32),
    /// No connection from the resolver's pool.
    Pool(PoolError),
    /// Any other database failure.
    Database(tokio_postgres::Error),
}

impl ResolveError {
    /// Whether this is a statement cancelled by `statement_timeout`.
    pub fn is_statement_timeout(&self) -> bool {
        matches!(self, ResolveError::StatementTimeout(_))
    }
}

fn is_timeout(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::QUERY_CANCELED)
}

impl From<tokio_postgres::Error> for ResolveError {
    fn from(error: tokio_postgres::Error) -> Self {
        if is_timeout(&error) {
            ResolveError::StatementTimeout(error)
        } else {
            ResolveError::Database(error)
        }
    }
}

impl From<PoolError> for ResolveError {
    fn from(error: PoolError) -> Self {
        match error {
            PoolError::Backend(error) if is_timeout(&error) => {
                ResolveError::StatementTimeout(error)
            }
            error => ResolveError::Pool(error),
        }
    }
}

/// `{:#}` adds the causes, as `anyhow` does: `a: b: c`.
impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::StatementTimeout(_) => {
                f.write_str("a resolution statement hit the statement timeout")?;
            }
            ResolveError::Conflicts(n) => {
                write!(
                    f,
                    "{n} version conflicts in a row; leaving it to the next round"
                )?;
            }
            ResolveError::Pool(_) => f.write_str("no resolver connection")?,
            ResolveError::Database(_) => f.write_str("database error")?,
        }
        if f.alternate() {
            let mut source = self.source();
            while let Some(cause) = source {
                write!(f, ": {cause}")?;
                source = cause.source();
            }
        }
        Ok(())
    }
}

impl Error for ResolveError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            ResolveError::StatementTimeout(e) | ResolveError::Database(e) => Some(e),
            ResolveError::Pool(e) => Some(e),
            ResolveError::Conflicts(_) => None,
        }
    }
}

/// Of the errors of statements sent together in one transaction, the one
/// that failed it. The statements after it fail with "current transaction
/// is aborted", and whichever error is seen first must not hide the cause
/// (a statement timeout shrinks the next batches).
pub(super) fn cause(
    errors: impl IntoIterator<Item = Option<tokio_postgres::Error>>,
) -> ResolveError {
    let errors: Vec<_> = errors.into_iter().flatten().collect();
    let first_cause = errors
        .iter()
        .position(|e| e.code() != Some(&SqlState::IN_FAILED_SQL_TRANSACTION))
        .unwrap_or(0);
    errors
        .into_iter()
        .nth(first_cause)
        .expect("called with at least one error")
        .into()
}
