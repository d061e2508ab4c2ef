//! L7 visibility without enforcement: Cilium's `policy.cilium.io/proxy-visibility` annotation.
//!
//! A pod (or its namespace) annotated `<Ingress/80/TCP/HTTP>,<Egress/53/UDP/DNS>` has the flows of
//! those directions, ports and protocols go through the L7 proxy, which parses and records every
//! request and denies none by L7. Visibility never changes what L3/L4 policy decides: a flow its
//! policy drops is still dropped, and a flow its L7 rules judge is still judged by them; it only
//! turns an L3/L4 allow into a redirect whose L7 side allows everything
//! ([`crate::snapshot::DirectionPolicy::l4_verdict_for`]).

use std::fmt;

use crate::model::{Direction, L7Parser};
use crate::snapshot::Proto;

/// The annotation's key (on a pod, or on its namespace for every pod in it).
pub const ANNOTATION: &str = "policy.cilium.io/proxy-visibility";

/// One `<Direction/Port/Protocol/L7>` item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Visibility {
    /// Ingress or egress.
    pub direction: Direction,
    /// Destination port.
    pub port: u16,
    /// Transport.
    pub proto: Proto,
    /// The parser the proxy applies.
    pub parser: L7Parser,
}

impl fmt::Display for Visibility {
    /// As the annotation writes it: `<Ingress/80/TCP/HTTP>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        };
        let parser = match self.parser {
            L7Parser::Http => "HTTP",
            L7Parser::Kafka => "Kafka",
            L7Parser::Dns => "DNS",
        };
        write!(f, "<{dir}/{}/{}/{parser}>", self.port, self.proto)
    }
}

/// Parses an annotation value: comma-separated `<Ingress|Egress/PORT/TCP|UDP/HTTP|Kafka|DNS>` items
/// (names are case-insensitive, as Cilium's). The error names the item and what is wrong with it.
pub fn parse(value: &str) -> Result<Vec<Visibility>, String> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        out.push(parse_item(item).map_err(|why| format!("item {item:?}: {why}"))?);
    }
    if out.is_empty() {
        return Err("no <Direction/Port/Protocol/L7> item".into());
    }
    Ok(out)
}

fn parse_item(item: &str) -> Result<Visibility, String> {
    let inner = item
        .strip_prefix('<')
        .and_then(|i| i.strip_suffix('>'))
        .ok_or("expected <Direction/Port/Protocol/L7>, in angle brackets")?;
    let parts: Vec<&str> = inner.split('/').collect();
    let [direction, port, proto, l7] = parts.as_slice() else {
        return Err(format!("expected 4 fields separated by '/', found {}", parts.len()));
    };
    let direction = match direction.to_ascii_lowercase().as_str() {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        other => return Err(format!("direction {other:?} is not Ingress or Egress")),
    };
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("port {port:?} is not a number in 1-65535")),
    };
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        other => return Err(format!("protocol {other:?} is not TCP or UDP")),
    };
    let parser = match l7.to_ascii_lowercase().as_str() {
        "http" => L7Parser::Http,
        "kafka" => L7Parser::Kafka,
        "dns" => L7Parser::Dns,
        other => return Err(format!("L7 protocol {other:?} is not HTTP, Kafka or DNS")),
    };
    let fits = match parser {
        L7Parser::Http | L7Parser::Kafka => proto == Proto::Tcp,
        L7Parser::Dns => proto == Proto::Udp,
    };
    if !fits {
        return Err(format!("{parser:?} is not proxied over {proto:?} (HTTP and Kafka: TCP; DNS: UDP)"));
    }
    Ok(Visibility { direction, port, proto, parser })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cilium_examples() {
        let v = parse("<Ingress/80/TCP/HTTP>,<Egress/53/UDP/DNS>").unwrap();
        assert_eq!(
            v,
            vec![
                Visibility { direction: Direction::Ingress, port: 80, proto: Proto::Tcp, parser: L7Parser::Http },
                Visibility { direction: Direction::Egress, port: 53, proto: Proto::Udp, parser: L7Parser::Dns },
            ]
        );
        let kafka = parse(" <egress/9092/tcp/kafka> ").unwrap();
        assert_eq!(kafka[0].parser, L7Parser::Kafka);
        assert_eq!(kafka[0].to_string(), "<Egress/9092/TCP/Kafka>");
    }

    #[test]
    fn errors_name_the_item() {
        for (bad, says) in [
            ("", "no <Direction"),
            ("Ingress/80/TCP/HTTP", "angle brackets"),
            ("<Ingress/80/TCP>", "4 fields"),
            ("<Inbound/80/TCP/HTTP>", "direction \"inbound\""),
            ("<Ingress/0/TCP/HTTP>", "port \"0\""),
            ("<Ingress/70000/TCP/HTTP>", "port \"70000\""),
            ("<Ingress/80/SCTP/HTTP>", "protocol \"SCTP\""),
            ("<Ingress/80/TCP/gopher>", "L7 protocol \"gopher\""),
            ("<Ingress/53/TCP/DNS>", "DNS: UDP"),
            ("<Ingress/80/TCP/HTTP>,<Egress/80/UDP/HTTP>", "item \"<Egress/80/UDP/HTTP>\""),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
