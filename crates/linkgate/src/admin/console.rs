//! The operator's console at `/`: one self-contained page (no external
//! script, style or font, so it works on a machine without Internet) that
//! fetches `/api/status` every two seconds and draws links, live
//! connections (with a filter), services and charts of the last minutes
//! from it.

/// The page, served as is.
pub const PAGE: &str = include_str!("console.html");
