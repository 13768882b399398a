//! Routing: which cluster a request goes to, by its `:authority` and `:path` (the listener's
//! `[[listener.route]]` entries, first match wins).

use crate::config::proxy::Route;

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
