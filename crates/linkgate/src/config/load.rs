//! Reading a configuration file and turning every kind of mistake into a
//! [`Problem`] that names the file, the key and (where known) line and column.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::model::Config;
use super::validate;

/// One step of a key path: a table key or a (0-based) array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySeg {
    /// `name` in `service[1].name`.
    Key(String),
    /// The position in an array of tables or values.
    Index(usize),
}

/// A path such as `service[2].allow` (indexes shown counting from 1, as a
/// person counts `[[service]]` blocks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<KeySeg>);

impl KeyPath {
    /// Builds a path from segments.
    pub fn new(segs: impl IntoIterator<Item = KeySeg>) -> Self {
        KeyPath(segs.into_iter().collect())
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                KeySeg::Key(key) if i == 0 => f.write_str(key)?,
                KeySeg::Key(key) => write!(f, ".{key}")?,
                KeySeg::Index(index) => write!(f, "[{}]", index + 1)?,
            }
        }
        Ok(())
    }
}

/// One thing wrong with a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file, as the user named it.
    pub file: String,
    /// 1-based line and column, where the mistake can be placed.
    pub line_col: Option<(usize, usize)>,
    /// The key the mistake is in.
    pub key: Option<KeyPath>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.line_col {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = self.key.as_ref().filter(|k| !k.0.is_empty()) {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the configuration: {source}")]
    Read {
        /// The file as named.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

fn display_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

/// A configuration that parsed and passed validation, with the directory
/// relative paths in it are taken from.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    /// The validated configuration (paths made absolute, defaults filled in).
    pub config: Config,
    /// Where the file was (or `None` for the built-in default).
    pub source: Option<PathBuf>,
    /// Settings that are valid but probably not what was meant, each as
    /// "file:line:col: key: what and why" (`check` prints them, `run` logs
    /// them as warnings).
    pub warnings: Vec<String>,
}

/// Reads, parses and validates the file at `path`.
pub fn load_file(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let config = parse_and_validate(&text, &file, &base)?;
    let warnings = validate::advisories(&config)
        .into_iter()
        .map(|(key, message)| {
            Problem {
                file: file.clone(),
                line_col: locate(&text, &key).map(|span| line_col(&text, span.start)),
                key: Some(key),
                message,
            }
            .to_string()
        })
        .collect();
    Ok(LoadedConfig {
        config,
        source: Some(path.to_path_buf()),
        warnings,
    })
}

/// Parses and validates `text`; `file` names it in messages and `base` is the
/// directory relative paths are resolved against.
pub fn parse_and_validate(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
    let mut config = parse(text, file)?;
    let problems = validate::validate(&mut config, base);
    if problems.is_empty() {
        return Ok(config);
    }
    let located = problems
        .into_iter()
        .map(|(key, message)| Problem {
            file: file.to_string(),
            line_col: locate(text, &key).map(|span| line_col(text, span.start)),
            key: Some(key),
            message,
        })
        .collect();
    Err(ConfigError::Invalid(located))
}

/// Syntax and schema check: TOML syntax, unknown keys, value formats.
fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let problem = |span: Option<Range<usize>>, key: Option<KeyPath>, message: &str| {
        ConfigError::Invalid(vec![Problem {
            file: file.to_string(),
            line_col: span.map(|s| line_col(text, s.start)),
            key,
            message: message.trim().to_string(),
        }])
    };
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| problem(e.span(), None, &format!("syntax error: {}", e.message())))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = key_path_of(e.path());
        let span = e.inner().span().or_else(|| locate(text, &key));
        problem(span, Some(key), e.inner().message())
    })
}

fn key_path_of(path: &serde_path_to_error::Path) -> KeyPath {
    use serde_path_to_error::Segment;
    KeyPath::new(path.iter().filter_map(|seg| match seg {
        Segment::Seq { index } => Some(KeySeg::Index(*index)),
        Segment::Map { key } => Some(KeySeg::Key(key.clone())),
        Segment::Enum { variant } => Some(KeySeg::Key(variant.clone())),
        Segment::Unknown => None,
    }))
}

/// Finds the byte span of the value at `path`, or of the deepest part of the
/// path that exists (so a missing key points at its table).
fn locate(text: &str, path: &KeyPath) -> Option<Range<usize>> {
    let root = DeTable::parse(text).ok()?;
    let mut span = None;
    let mut table: Option<&DeTable> = Some(root.get_ref());
    let mut value: Option<&DeValue> = None;
    for seg in &path.0 {
        let next = match (seg, table, value) {
            (KeySeg::Key(key), Some(t), _) => t
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == key.as_str())
                .map(|(_, v)| v),
            (KeySeg::Index(i), _, Some(DeValue::Array(items))) => items.into_iter().nth(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        span = Some(next.span());
        value = Some(next.get_ref());
        table = match next.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
    }
    span
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
