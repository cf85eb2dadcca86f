//! [`UsageError`]: bad input on the command line or in a config file.

/// A bad flag, config key or value: reported on one line, exit code 2.
#[derive(Debug)]
pub struct UsageError {
    /// The flag (or config key) at fault, e.g. `--idle`.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand for a [`UsageError`] as an `anyhow::Error`.
pub fn usage(field: &'static str, message: impl Into<String>) -> anyhow::Error {
    UsageError {
        field,
        message: message.into(),
    }
    .into()
}
