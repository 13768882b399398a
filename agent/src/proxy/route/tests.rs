#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn r(authority: Option<&str>, prefix: &str, cluster: usize) -> Route {
    Route {
        authority: authority.map(str::to_owned),
        path_prefix: prefix.to_owned(),
        cluster,
    }
}

#[test]
fn first_matching_route_wins() {
    let routes = [
        r(None, "/orders.v1.Orders/", 0),
        r(Some("payments.internal"), "/", 1),
        r(None, "/", 2),
    ];
    assert_eq!(
        route(&routes, Some("x"), "/orders.v1.Orders/Create"),
        Some(0)
    );
    assert_eq!(
        route(&routes, Some("payments.internal"), "/p.P/Pay"),
        Some(1)
    );
    assert_eq!(
        route(&routes, Some("PAYMENTS.internal:8443"), "/p.P/Pay"),
        Some(1)
    );
    assert_eq!(
        route(&routes, Some("payments.internal:x"), "/p.P/Pay"),
        Some(2)
    );
    assert_eq!(route(&routes, None, "/p.P/Pay"), Some(2));
    assert_eq!(route(&routes[..2], Some("other"), "/p.P/Pay"), None);
}
