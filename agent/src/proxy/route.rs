//! Routing: which cluster a request goes to, by its `:authority` and `:path` (the listener's
//! `[[listener.route]]` entries, first match wins); and which cluster claims an intercepted
//! connection's original destination (the most specific claim wins).

use std::net::SocketAddr;

use crate::config::{intercept::Destinations, proxy::Route};

/// The cluster whose claim on `to` is the most specific: the longest prefix, then one that
/// names the port. None: no cluster claims it (the passthrough cluster serves it).
pub fn claimant(claims: &[(usize, Destinations)], to: SocketAddr) -> Option<usize> {
    claims
        .iter()
        .filter_map(|(cluster, d)| Some((d.specificity(to)?, *cluster)))
        .max_by_key(|&(specificity, _)| specificity)
        .map(|(_, cluster)| cluster)
}

/// The first route that matches the request, as an index into the clusters.
pub fn route(routes: &[Route], authority: Option<&str>, path: &str) -> Option<usize> {
    let authority = authority.map(str::to_ascii_lowercase);
    routes.iter().find_map(|r| {
        let authority_ok = match (&r.authority, &authority) {
            (None, _) => true,
            (Some(want), Some(got)) => {
                got == want
                    || got
                        .rsplit_once(':')
                        .is_some_and(|(host, port)| host == want && port.parse::<u16>().is_ok())
            }
            (Some(_), None) => false,
        };
        (authority_ok && path.starts_with(&r.path_prefix)).then_some(r.cluster)
    })
}

#[cfg(test)]
mod tests;
