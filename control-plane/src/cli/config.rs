//! `cronium serve --config FILE`: a file of `KEY=VALUE` lines that names settings by their
//! environment variables. Each value becomes the default of the flag that reads that variable,
//! so clap's own order applies: the flag, then the environment, then the file, then the
//! built-in default. The keys are found, not listed: every `serve` flag with an environment
//! variable (and the global ones, such as `CRONIUM_LOG_FORMAT`), so a new setting can be put in
//! the file as soon as it has a flag. An unknown key, a key given twice, a malformed line or a
//! value its flag would refuse stops the start, naming the file, the line and the key (never a
//! value of a flag whose environment value is hidden, such as `ENCRYPTION_KEY`).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{Arg, CommandFactory, FromArgMatches};

use super::Cli;

/// The subcommand that takes `--config`.
const SERVE: &str = "serve";

/// Parses the command line (as `Cli::parse` would, `Err` where it would exit); for `cronium
/// serve --config FILE`, the file's settings are applied first.
pub(super) fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // A first parse finds `--config` (and answers `--help`, `--version` and mistakes as usual:
    // the file only adds defaults, so it cannot make a failing command line valid).
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(&args)?;
    let config = match matches.subcommand() {
        Some((SERVE, serve)) => serve.get_one::<PathBuf>("config").cloned(),
        _ => None,
    };
    let Some(path) = config else {
        return Cli::from_arg_matches(&matches).map_err(|error| error.format(&mut command));
    };
    let settings = read(&path).map_err(|(kind, message)| Cli::command().error(kind, message))?;
    let mut command = settings
        .iter()
        .fold(Cli::command(), |command, (key, setting)| {
            with_default(command, key, &setting.value, false)
        });
    let matches = command.try_get_matches_from_mut(&args)?;
    Cli::from_arg_matches(&matches).map_err(|error| error.format(&mut command))
}

/// One line of the file.
struct Setting {
    value: String,
    line: usize,
}

/// Reads and checks the file: every key names a setting, once, with a value its flag accepts.
fn read(path: &Path) -> Result<BTreeMap<String, Setting>, (ErrorKind, String)> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|error| {
        (
            ErrorKind::Io,
            format!("cannot read the config file {file}: {error}"),
        )
    })?;
    let known = known_settings();
    let mut settings = BTreeMap::<String, Setting>::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // The line itself is never quoted back: it may hold a secret.
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err((
                ErrorKind::InvalidValue,
                format!("{file}, line {number}: not a KEY=VALUE line (nor blank, nor a # comment)"),
            ));
        };
        let key = key.trim();
        if !is_variable_name(key) {
            return Err((
                ErrorKind::InvalidValue,
                format!("{file}, line {number}: {key:?} is not an environment variable name"),
            ));
        }
        let Some(&hidden) = known.get(key) else {
            return Err((
                ErrorKind::UnknownArgument,
                format!(
                    "{file}, line {number}: unknown setting {key}: no `cronium serve` flag reads \
                     that environment variable (see `cronium serve --help`)"
                ),
            ));
        };
        if let Some(earlier) = settings.get(key) {
            return Err((
                ErrorKind::ArgumentConflict,
                format!(
                    "{file}, line {number}: {key} is set again (first on line {})",
                    earlier.line
                ),
            ));
        }
        let value = unquoted(value.trim());
        check_value(key, value, hidden).map_err(|reason| {
            (
                ErrorKind::ValueValidation,
                format!("{file}, line {number}: {key}: {reason}"),
            )
        })?;
        settings.insert(
            key.to_owned(),
            Setting {
                value: value.to_owned(),
                line: number,
            },
        );
    }
    Ok(settings)
}

/// The environment variables of `serve`'s flags and of the global flags, each with whether its
/// values are hidden (`hide_env_values`).
fn known_settings() -> BTreeMap<String, bool> {
    let command = Cli::command();
    let global = command.get_arguments().filter(|arg| arg.is_global_set());
    let serve = command
        .find_subcommand(SERVE)
        .into_iter()
        .flat_map(|serve| serve.get_arguments());
    global
        .chain(serve)
        .filter_map(|arg| {
            let name = arg.get_env()?.to_str()?;
            Some((name.to_owned(), arg.is_hide_env_values_set()))
        })
        .collect()
}

/// `command` with `value` as the default of the flag (of `serve`, or a global one) that reads
/// the environment variable `key`; `ignore_env` also stops that flag from reading it.
fn with_default(command: clap::Command, key: &str, value: &str, ignore_env: bool) -> clap::Command {
    let apply = |arg: Arg| {
        if arg.get_env() != Some(OsStr::new(key)) {
            return arg;
        }
        let hidden = arg.is_hide_env_values_set() && arg.get_action().takes_values();
        let mut arg = arg.default_value(value.to_owned());
        if hidden {
            arg = arg.hide_default_value(true);
        }
        if ignore_env { arg.env(None) } else { arg }
    };
    command
        .mut_args(|arg| if arg.is_global_set() { apply(arg) } else { arg })
        .mut_subcommand(SERVE, |serve| serve.mut_args(apply))
}

/// Whether `value` is one the flag that reads `key` accepts: `cronium serve` parsed with that
/// value alone, as the flag's default and its environment variable ignored.
fn check_value(key: &str, value: &str, hidden: bool) -> Result<(), String> {
    let probe = with_default(Cli::command(), key, value, true);
    match probe.try_get_matches_from(["cronium", SERVE]) {
        Ok(_) => Ok(()),
        Err(_) if hidden => Err("invalid value".to_owned()),
        Err(error) => {
            let rendered = error.to_string();
            let first = rendered.lines().next().unwrap_or_default();
            Err(first.strip_prefix("error: ").unwrap_or(first).to_owned())
        }
    }
}

/// Letters, digits and `_`, not starting with a digit.
fn is_variable_name(key: &str) -> bool {
    !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !key.starts_with(|c: char| c.is_ascii_digit())
}

/// `value` without one pair of surrounding double or single quotes.
fn unquoted(value: &str) -> &str {
    for quote in ['"', '\''] {
        if value.len() >= 2
            && let Some(inner) = value
                .strip_prefix(quote)
                .and_then(|rest| rest.strip_suffix(quote))
        {
            return inner;
        }
    }
    value
}

#[cfg(test)]
mod tests;
