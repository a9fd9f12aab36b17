//! What went wrong, as far as a script needs to know, and the errors every
//! layer shares.
//!
//! Each library error type says which [`ErrorKind`] it is by implementing
//! [`Classify`] next to its definition; the front (`cli::error_kind`) walks an
//! error's chain and asks each typed error it meets. The kinds, their exit
//! codes and hints are the contract of `docs/exit-codes.md`.
//!
//! A leaf: imports nothing from the crate, so any layer may implement
//! [`Classify`] without importing upwards.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

/// Each kind has an exit code (`docs/exit-codes.md`) and a hint for a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Exit 1: the command line is wrong (unknown option, missing argument,
    /// a livecd-iso-to-disk option livestick refuses).
    Usage,
    /// Exit 2: the inputs are wrong (bad ISO, target too small, invalid
    /// label, a feature not available in this build).
    BadInput,
    /// Exit 3: the target was refused for safety (mounted, in use, not
    /// removable, no confirmation); nothing was written.
    Refused,
    /// Exit 4: reading or writing failed, or a needed program failed.
    Io,
    /// Exit 5: several targets were written and some of them failed.
    PartialBatch,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage => 1,
            ErrorKind::BadInput => 2,
            ErrorKind::Refused => 3,
            ErrorKind::Io => 4,
            ErrorKind::PartialBatch => 5,
        }
    }

    pub fn hint(self) -> &'static str {
        match self {
            ErrorKind::Usage => {
                "run `livestick help <command>` for the options; `livestick iso-to-disk --help` for the livecd-iso-to-disk ones"
            }
            ErrorKind::BadInput => {
                "nothing was written; fix the input named above (`livestick inspect ISO` shows what livestick sees in an ISO)"
            }
            ErrorKind::Refused => {
                "nothing was written; check that this is the stick you mean — the message names the option that overrides the check"
            }
            ErrorKind::Io => {
                "check the device and its connection (dmesg), free space, and `livestick doctor` for missing programs; then run the same command again"
            }
            ErrorKind::PartialBatch => {
                "the targets that succeeded are complete; run the command again for the ones listed as failed"
            }
        }
    }
}

/// Implemented by every typed error of the library, beside its definition,
/// so that the exit code follows from the type and never from the message.
///
/// A variant that wraps another typed error with `#[error(transparent)]`
/// hides the wrapped error from the chain: where the wrapped error can be a
/// refusal or a permission problem (`StickError::Target`), the variant answers
/// with the wrapped error's kind and hint; the others still answer `Io`.
pub trait Classify {
    fn kind(&self) -> ErrorKind;

    /// What to do next, when this error knows better than its kind's
    /// general [`ErrorKind::hint`].
    fn hint(&self) -> &'static str {
        self.kind().hint()
    }
}

/// The kind and hint of an error, as the one error of its chain that decides gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub kind: ErrorKind,
    pub hint: &'static str,
}

impl Verdict {
    fn of(error: &impl Classify) -> Verdict {
        Verdict {
            kind: error.kind(),
            hint: error.hint(),
        }
    }
}

/// Asks one error of a chain for its verdict if it is of one particular type:
/// `classifier::<TargetError>` is the entry for `TargetError` in a list.
pub type Classifier = fn(&(dyn StdError + 'static)) -> Option<Verdict>;

/// The [`Classifier`] of `E`.
pub fn classifier<E: Classify + StdError + 'static>(
    error: &(dyn StdError + 'static),
) -> Option<Verdict> {
    error.downcast_ref::<E>().map(Verdict::of)
}

/// Told to a user who may not open a device or file they named.
pub const PERMISSION_HINT: &str = "nothing was written; run livestick as root (sudo), or as a user in a group with access to the device (`ls -l` shows its group, often `disk`) or to the file";

/// The kind of a failure to open or look at a path the user named: a file
/// that is not there, or one they may not open, is theirs to fix; anything
/// else is I/O.
pub fn open_failure_kind(error: &io::Error) -> ErrorKind {
    match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => ErrorKind::BadInput,
        _ => ErrorKind::Io,
    }
}

/// The hint for an error of [`open_failure_kind`].
pub fn open_failure_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::PermissionDenied => PERMISSION_HINT,
        _ => open_failure_kind(error).hint(),
    }
}

/// The kind of the outermost error in `err`'s chain that one of
/// `classifiers` recognises. Anything unrecognised is an I/O failure: it is
/// the safe reading for a script (retry, do not assume the input was at fault).
///
/// A typed error given as the *context* of another (`.context(BadInput(..))`)
/// is not seen: anyhow hands the chain out wrapped in its own context type.
pub fn error_kind_among(err: &anyhow::Error, classifiers: &[Classifier]) -> ErrorKind {
    verdict_among(err, classifiers).kind
}

/// The kind (as [`error_kind_among`]) and the hint of `err`.
pub fn verdict_among(err: &anyhow::Error, classifiers: &[Classifier]) -> Verdict {
    err.chain()
        .find_map(|cause| classifiers.iter().find_map(|classify| classify(cause)))
        .unwrap_or(Verdict {
            kind: ErrorKind::Io,
            hint: ErrorKind::Io.hint(),
        })
}

/// A path named on the command line that could not be opened or looked at.
#[derive(Debug, thiserror::Error)]
#[error("{}", .path.display())]
pub struct CannotOpen {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl Classify for CannotOpen {
    fn kind(&self) -> ErrorKind {
        open_failure_kind(&self.source)
    }

    fn hint(&self) -> &'static str {
        open_failure_hint(&self.source)
    }
}

/// A problem with what the user gave us (exit code 2), as opposed to an I/O failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

impl Classify for BadInput {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadInput
    }
}

/// Bad input (exit code 2) found by a check that failed for a reason worth
/// naming: the reason stays in the chain as the cause. (Given as anyhow's
/// `.context(BadInput(..))` instead, the kind would be invisible to the chain
/// walk; see [`error_kind_among`].)
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BadInputBecause {
    pub message: String,
    #[source]
    pub source: Box<dyn StdError + Send + Sync + 'static>,
}

impl Classify for BadInputBecause {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadInput
    }
}

/// Exit code for a batch where some targets failed and some succeeded.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} targets failed: {}", .details.join("; "))]
pub struct PartialBatchFailure {
    pub failed: usize,
    pub total: usize,
    pub details: Vec<String>,
}

impl Classify for PartialBatchFailure {
    fn kind(&self) -> ErrorKind {
        ErrorKind::PartialBatch
    }
}

/// A question that needed an answer when there was no terminal to ask on:
/// a safety refusal (nothing was written), told apart from I/O by its type.
#[derive(Debug, thiserror::Error)]
#[error("{question}\nrefusing without confirmation: no terminal to ask on; add --yes to proceed")]
pub struct NoConfirmation {
    pub question: String,
}

impl Classify for NoConfirmation {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Refused
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    const SHARED_CLASSIFIERS: &[Classifier] = &[
        classifier::<BadInput>,
        classifier::<PartialBatchFailure>,
        classifier::<NoConfirmation>,
        classifier::<CannotOpen>,
    ];

    #[test]
    fn each_kind_has_its_documented_exit_code() {
        let codes = [
            (ErrorKind::Usage, 1),
            (ErrorKind::BadInput, 2),
            (ErrorKind::Refused, 3),
            (ErrorKind::Io, 4),
            (ErrorKind::PartialBatch, 5),
        ];
        for (kind, code) in codes {
            assert_eq!(kind.exit_code(), code, "{kind:?}");
            assert!(!kind.hint().is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn a_typed_error_is_found_under_several_contexts() {
        let result: Result<(), BadInput> = Err(BadInput("label too long".into()));
        let err = result
            .context("checking the label")
            .context("planning the write")
            .context("writing stick.img")
            .unwrap_err();
        assert_eq!(
            error_kind_among(&err, SHARED_CLASSIFIERS),
            ErrorKind::BadInput
        );

        let refusal = anyhow::Error::new(NoConfirmation {
            question: "Erase /dev/sdb?".into(),
        })
        .context("confirming")
        .context("writing /dev/sdb");
        assert_eq!(
            error_kind_among(&refusal, SHARED_CLASSIFIERS),
            ErrorKind::Refused
        );
    }

    #[test]
    fn the_outermost_typed_error_decides() {
        let inner = anyhow::Error::new(BadInput("inner".into()));
        let batch = inner.context(PartialBatchFailure {
            failed: 1,
            total: 2,
            details: vec!["/dev/sdc: pulled".into()],
        });
        // A typed context is invisible to the chain (see error_kind_among);
        // what is found is the typed error underneath.
        assert_eq!(
            error_kind_among(&batch, SHARED_CLASSIFIERS),
            ErrorKind::BadInput
        );

        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BadInput);
        impl Classify for Outer {
            fn kind(&self) -> ErrorKind {
                ErrorKind::Refused
            }
        }
        let err = anyhow::Error::new(Outer(BadInput("inner".into())));
        let classifiers: &[Classifier] = &[classifier::<Outer>, classifier::<BadInput>];
        assert_eq!(error_kind_among(&err, classifiers), ErrorKind::Refused);
    }

    #[test]
    fn a_missing_or_forbidden_path_is_bad_input_and_says_how_to_get_access() {
        let classifiers: &[Classifier] = &[classifier::<CannotOpen>];
        let open = |kind: io::ErrorKind| {
            anyhow::Error::new(CannotOpen {
                path: PathBuf::from("/dev/sdb"),
                source: io::Error::from(kind),
            })
            .context("reading the home")
        };
        let denied = verdict_among(&open(io::ErrorKind::PermissionDenied), classifiers);
        assert_eq!(denied.kind, ErrorKind::BadInput);
        assert!(denied.hint.contains("root") && denied.hint.contains("group"));
        let missing = verdict_among(&open(io::ErrorKind::NotFound), classifiers);
        assert_eq!(missing, Verdict::of(&BadInput(String::new())));
        let failed = verdict_among(&open(io::ErrorKind::TimedOut), classifiers);
        assert_eq!(failed.kind, ErrorKind::Io);
    }

    #[test]
    fn an_unknown_error_is_io() {
        let err = anyhow::anyhow!("something nobody typed").context("reading the stick");
        assert_eq!(error_kind_among(&err, SHARED_CLASSIFIERS), ErrorKind::Io);
        let io = anyhow::Error::new(std::io::Error::other("EIO")).context("reading");
        assert_eq!(error_kind_among(&io, SHARED_CLASSIFIERS), ErrorKind::Io);
        assert_eq!(error_kind_among(&io, &[]), ErrorKind::Io);
    }
}
