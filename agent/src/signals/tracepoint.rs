//! The record layout of a tracepoint: its `format` file in tracefs.
//!
//! Tracepoint records change between kernels (`tcp_send_reset` was reshaped in 6.10), so the
//! agent reads offsets and symbol tables from the running kernel instead of hard-coding them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracepoint {category}/{name} does not exist on this kernel ({path})")]
    NoTracepoint {
        category: String,
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed format file for {tracepoint}: {line:?}")]
    Malformed { tracepoint: String, line: String },
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

/// Parsed `format` file of one tracepoint.
#[derive(Clone, Debug, Default)]
pub struct TracepointFormat {
    pub fields: HashMap<String, Field>,
    /// `__print_symbolic(REC->field, { value, "NAME" }, ...)` tables whose values the kernel
    /// resolved to numbers (those declared with TRACE_DEFINE_ENUM), by field name.
    pub symbols: HashMap<String, HashMap<u64, String>>,
}

impl TracepointFormat {
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self, TracefsError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::NoTracepoint {
            category: category.to_owned(),
            name: name.to_owned(),
            path: path.clone(),
            source,
        })?;
        Self::parse(&format!("{category}/{name}"), &text)
    }

    pub fn parse(tracepoint: &str, text: &str) -> Result<Self, TracefsError> {
        let mut format = Self::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("field:") {
                let (name, field) = parse_field(rest).ok_or_else(|| TracefsError::Malformed {
                    tracepoint: tracepoint.to_owned(),
                    line: line.to_owned(),
                })?;
                format.fields.insert(name, field);
            } else if let Some(fmt) = line.strip_prefix("print fmt:") {
                format.symbols = parse_symbol_tables(fmt);
            }
        }
        Ok(format)
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.get(name)
    }

    /// End of the last field: how many bytes of the record carry data.
    pub fn record_len(&self) -> usize {
        self.fields
            .values()
            .map(|f| f.offset + f.size)
            .max()
            .unwrap_or(0)
    }
}

/// `const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;` -> ("skaddr", Field { 16, 8 }).
fn parse_field(rest: &str) -> Option<(String, Field)> {
    let mut parts = rest.split(';').map(str::trim);
    let decl = parts.next()?;
    let mut offset = None;
    let mut size = None;
    for part in parts {
        if let Some(v) = part.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    // The name is the last identifier of the declaration, before any array suffix.
    let decl = decl.split('[').next()?.trim_end();
    let name = decl
        .rsplit(|c: char| c.is_whitespace() || c == '*')
        .next()?;
    if name.is_empty() {
        return None;
    }
    Some((
        name.to_owned(),
        Field {
            offset: offset?,
            size: size?,
        },
    ))
}

/// Finds `__print_symbolic(REC->x, { 0, "A" }, { 1, "B" })` with numeric values.
fn parse_symbol_tables(fmt: &str) -> HashMap<String, HashMap<u64, String>> {
    let mut tables = HashMap::new();
    let mut rest = fmt;
    while let Some(start) = rest.find("__print_symbolic(REC->") {
        rest = &rest[start + "__print_symbolic(REC->".len()..];
        let Some(comma) = rest.find(',') else { break };
        let field = rest[..comma].trim().to_owned();
        let mut table = HashMap::new();
        let mut body = &rest[comma..];
        // Entries run until the closing parenthesis of this call.
        while let Some(open) = body.find('{') {
            if body[..open].contains(')') {
                break;
            }
            let Some(close) = body[open..].find('}') else {
                break;
            };
            let entry = &body[open + 1..open + close];
            if let Some((value, name)) = entry.split_once(',')
                && let Ok(value) = value.trim().parse::<u64>()
            {
                table.insert(value, name.trim().trim_matches('"').to_owned());
            }
            body = &body[open + close + 1..];
        }
        if !table.is_empty() {
            tables.insert(field, table);
        }
        rest = body;
    }
    tables
}

#[cfg(test)]
mod tests;
