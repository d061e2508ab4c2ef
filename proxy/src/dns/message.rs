//! DNS messages as the proxy judges them (hickory-proto does the wire format): a query it can
//! judge, the answers it sends itself, and what an upstream answer teaches.
//!
//! A query is judged only when it reads one way: a query (not a response), opcode QUERY, exactly
//! one question. Anything else is never forwarded: bytes that are not even a header are dropped;
//! a header with a body that does not parse, or several questions, get FORMERR; other opcodes get
//! NOTIMP.

use std::net::IpAddr;

pub use hickory_proto::op::ResponseCode;
use hickory_proto::op::{Message, MessageType, OpCode, Query as Question};
use hickory_proto::rr::{RData, RecordType};
use policy_engine::dns::normalize_name;

/// The DNS header's size.
pub const HEADER_LEN: usize = 12;
/// The longest CNAME chain followed.
const MAX_CHAIN: usize = 16;

/// A query the proxy can judge.
#[derive(Clone, Debug)]
pub struct Query {
    /// The message as parsed.
    pub message: Message,
    /// Header and question exactly as received (answers echo the question byte for byte: case
    /// included, which resolvers that randomise it check).
    head: Vec<u8>,
    /// The question's name: lower case, fully qualified (`api.example.com.`); bytes outside
    /// printable ASCII escaped (`\DDD`), so they never match a name pattern.
    pub name: String,
    /// The question's type.
    pub qtype: RecordType,
}

impl Query {
    /// The message id.
    pub fn id(&self) -> u16 {
        self.message.metadata.id
    }

    /// The question.
    pub fn question(&self) -> Option<&Question> {
        self.message.queries.first()
    }
}

/// Why a message cannot be judged, and what to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unjudgeable {
    /// Not even a header, or not a query: nothing is answered.
    Drop(String),
    /// Answered with this message (FORMERR, NOTIMP), never forwarded.
    Answer {
        /// The answer, ready to send.
        reply: Vec<u8>,
        /// Why.
        why: String,
    },
}

impl Unjudgeable {
    /// Why.
    pub fn why(&self) -> &str {
        match self {
            Self::Drop(w) | Self::Answer { why: w, .. } => w,
        }
    }
}

/// An answer carrying only a header: `id` and opcode from the raw header, this response code.
fn header_only(raw: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let id = u16::from_be_bytes([raw.first().copied().unwrap_or(0), raw.get(1).copied().unwrap_or(0)]);
    let opcode = OpCode::from_u8((raw.get(2).copied().unwrap_or(0) >> 3) & 0x0f);
    Message::error_msg(id, opcode, rcode).to_vec().unwrap_or_default()
}

/// Reads a query off the wire.
pub fn parse_query(raw: &[u8]) -> Result<Query, Unjudgeable> {
    if raw.len() < HEADER_LEN {
        return Err(Unjudgeable::Drop(format!("{} bytes: shorter than a DNS header", raw.len())));
    }
    if raw.get(2).is_some_and(|b| b & 0x80 != 0) {
        return Err(Unjudgeable::Drop("a response, not a query".into()));
    }
    let message = match Message::from_vec(raw) {
        Ok(m) => m,
        Err(e) => {
            return Err(Unjudgeable::Answer {
                reply: header_only(raw, ResponseCode::FormErr),
                why: format!("malformed query: {e}"),
            });
        }
    };
    if message.metadata.op_code != OpCode::Query {
        return Err(Unjudgeable::Answer {
            reply: header_only(raw, ResponseCode::NotImp),
            why: format!("opcode {:?} is not a query", message.metadata.op_code),
        });
    }
    if message.queries.len() != 1 {
        return Err(Unjudgeable::Answer {
            reply: header_only(raw, ResponseCode::FormErr),
            why: format!("{} questions: a query must have exactly one", message.queries.len()),
        });
    }
    let (name, qtype) = match message.queries.first() {
        Some(q) => (normalize_name(&q.name().to_lowercase().to_ascii()), q.query_type()),
        None => return Err(Unjudgeable::Drop("no question".into())),
    };
    let head = raw.get(..question_end(raw).unwrap_or(HEADER_LEN)).unwrap_or(raw).to_vec();
    Ok(Query { message, head, name, qtype })
}

/// Where the (only) question of a well-formed query ends: its name's labels (or a pointer), then
/// type and class.
fn question_end(raw: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = *raw.get(at)?;
        match len {
            0 => break at.checked_add(1 + 4).filter(|end| *end <= raw.len()),
            l if l & 0xc0 == 0xc0 => break at.checked_add(2 + 4).filter(|end| *end <= raw.len()),
            l => at = at.checked_add(1 + usize::from(l))?,
        }
    }
}

/// The proxy's own answer to a query: its header and question byte for byte (id, opcode,
/// recursion-desired, the question's case), marked a response, recursion available, this response
/// code, no records.
pub fn answer(query: &Query, rcode: ResponseCode) -> Vec<u8> {
    let mut out = query.head.clone();
    if out.len() < HEADER_LEN {
        return header_only(&query.id().to_be_bytes(), rcode);
    }
    if let Some(flags) = out.get_mut(2) {
        // QR, the opcode and RD kept; AA and TC cleared.
        *flags = 0x80 | (*flags & 0x79);
    }
    if let Some(flags) = out.get_mut(3) {
        *flags = 0x80 | (u16::from(rcode) & 0x0f) as u8;
    }
    // One question, no answer, authority or additional records.
    if let Some(counts) = out.get_mut(4..HEADER_LEN) {
        counts.copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    }
    out
}

/// What an upstream answer says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// Response code (its numeric value).
    pub rcode: u16,
    /// The answer was truncated (TC): the client retries over TCP.
    pub truncated: bool,
    /// The question's name and the CNAME chain from it (each lower case, fully qualified).
    pub names: Vec<String>,
    /// A and AAAA addresses of the chain's names.
    pub ips: Vec<IpAddr>,
    /// The lowest TTL of the records used (seconds; 0 without addresses).
    pub ttl: u32,
    /// Types of the answer records.
    pub rrtypes: Vec<String>,
}

impl Answer {
    /// The CNAME chain (the names after the question's own).
    pub fn cnames(&self) -> &[String] {
        self.names.get(1..).unwrap_or(&[])
    }
}

fn key(n: &hickory_proto::rr::Name) -> String {
    normalize_name(&n.to_lowercase().to_ascii())
}

/// Reads the upstream's answer to `query`. An answer that is not a response to it (another id,
/// another question) is refused: it must not be released, nor teach anything.
pub fn read_answer(raw: &[u8], query: &Query) -> Result<Answer, String> {
    let m = Message::from_vec(raw).map_err(|e| format!("malformed answer: {e}"))?;
    if m.metadata.message_type != MessageType::Response {
        return Err("the upstream sent a query, not an answer".into());
    }
    if m.metadata.id != query.id() {
        return Err(format!("answer id {} for query id {}", m.metadata.id, query.id()));
    }
    match (m.queries.as_slice(), query.question()) {
        ([q], Some(asked))
            if key(q.name()) == query.name
                && q.query_type() == asked.query_type()
                && q.query_class() == asked.query_class() => {}
        // Error answers may leave the question out.
        ([], _) if m.metadata.response_code != ResponseCode::NoError => {}
        _ => return Err(format!("the answer is not for the question asked ({})", query.name)),
    }
    let mut out = Answer {
        rcode: u16::from(m.metadata.response_code),
        truncated: m.metadata.truncation,
        names: vec![query.name.clone()],
        ..Answer::default()
    };
    let mut ttl: Option<u32> = None;
    // The chain: from the question's name through CNAME records of the answer section.
    let mut current = query.name.clone();
    for _ in 0..MAX_CHAIN {
        let next = m.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) if key(&r.name) == current => Some((key(&c.0), r.ttl)),
            _ => None,
        });
        let Some((target, t)) = next else { break };
        if out.names.contains(&target) {
            break;
        }
        ttl = Some(ttl.map_or(t, |x| x.min(t)));
        out.names.push(target.clone());
        current = target;
    }
    let mut chain_ttl = ttl;
    for r in &m.answers {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if out.names.contains(&key(&r.name)) && !out.ips.contains(&ip) {
            out.ips.push(ip);
            chain_ttl = Some(chain_ttl.map_or(r.ttl, |x| x.min(r.ttl)));
        }
    }
    if !out.ips.is_empty() {
        out.ttl = chain_ttl.unwrap_or(0);
    }
    let mut types: Vec<String> = m.answers.iter().map(|r| r.record_type().to_string()).collect();
    types.sort();
    types.dedup();
    out.rrtypes = types;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, Record};
    use std::str::FromStr as _;

    fn query_bytes(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Question::query(Name::from_str(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    #[test]
    fn a_query_reads_one_way() {
        let q = parse_query(&query_bytes("API.Example.COM.", RecordType::A, 7)).unwrap();
        assert_eq!((q.name.as_str(), q.qtype, q.id()), ("api.example.com.", RecordType::A, 7));
        // Refusal: same id and question, REFUSED.
        let r = Message::from_vec(&answer(&q, ResponseCode::Refused)).unwrap();
        assert_eq!(r.metadata.id, 7);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert!(r.metadata.recursion_desired);
        assert_eq!(r.queries.len(), 1);
    }

    #[test]
    fn what_cannot_be_judged_is_never_forwarded() {
        assert!(matches!(parse_query(b"short"), Err(Unjudgeable::Drop(_))));
        // Two questions: FORMERR.
        let mut m = Message::query();
        m.metadata.id = 9;
        m.add_query(Question::query(Name::from_str("a.example.com.").unwrap(), RecordType::A));
        m.add_query(Question::query(Name::from_str("evil.test.").unwrap(), RecordType::A));
        match parse_query(&m.to_vec().unwrap()) {
            Err(Unjudgeable::Answer { reply, .. }) => {
                let r = Message::from_vec(&reply).unwrap();
                assert_eq!((r.metadata.id, r.metadata.response_code), (9, ResponseCode::FormErr));
            }
            other => panic!("{other:?}"),
        }
        // A compression loop in the question: FORMERR from the header alone.
        let mut loop_q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        loop_q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        match parse_query(&loop_q) {
            Err(Unjudgeable::Answer { reply, .. }) => {
                assert_eq!(Message::from_vec(&reply).unwrap().metadata.response_code, ResponseCode::FormErr);
            }
            other => panic!("{other:?}"),
        }
        // A response sent as a query: dropped.
        let mut resp = query_bytes("a.example.com.", RecordType::A, 1);
        resp[2] |= 0x80;
        assert!(matches!(parse_query(&resp), Err(Unjudgeable::Drop(_))));
        // An UPDATE: NOTIMP.
        let mut upd = query_bytes("a.example.com.", RecordType::A, 1);
        upd[2] = (upd[2] & 0x87) | (5 << 3);
        match parse_query(&upd) {
            Err(Unjudgeable::Answer { reply, .. }) => {
                assert_eq!(Message::from_vec(&reply).unwrap().metadata.response_code, ResponseCode::NotImp);
            }
            other => panic!("{other:?}"),
        }
        // Odd bytes in a name are escaped: they can never match a name pattern.
        let mut odd = Message::query();
        odd.add_query(Question::query(Name::from_labels(vec![&b"a b"[..], b"test"]).unwrap(), RecordType::A));
        let q = parse_query(&odd.to_vec().unwrap()).unwrap();
        assert!(q.name.contains('\\'), "{}", q.name);
    }

    /// Cilium's wire cases (`dnsproxy_check_allowed.yaml`): a denied query is answered with the
    /// configured code; the question's case is kept end to end while matching ignores it.
    #[test]
    fn cilium_wire_cases() {
        let q = parse_query(&query_bytes("notcilium.io.", RecordType::A, 11)).unwrap();
        for (rcode, value) in [(ResponseCode::Refused, 5u16), (ResponseCode::NXDomain, 3), (ResponseCode::ServFail, 2)]
        {
            let r = Message::from_vec(&answer(&q, rcode)).unwrap();
            assert_eq!(u16::from(r.metadata.response_code), value);
        }
        // Built by hand: hickory-proto writes names in lower case.
        let mut raw = vec![0, 12, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 6];
        raw.extend_from_slice(b"CILIUM");
        raw.extend_from_slice(&[2, b'i', b'o', 0, 0, 1, 0, 1]);
        let q = parse_query(&raw).unwrap();
        assert_eq!(q.name, "cilium.io.", "matched case-insensitively");
        let r = answer(&q, ResponseCode::Refused);
        assert_eq!(&r[12..], &raw[12..], "the question is echoed byte for byte, case included");
        assert_eq!((r[0], r[1], r[2], r[3] & 0x0f), (0, 12, 0x81, 5));
        assert_eq!(Message::from_vec(&r).unwrap().metadata.response_code, ResponseCode::Refused);
        // An upstream answer echoing the mixed case is the answer to this question.
        let n = Name::from_str("CILIUM.io.").unwrap();
        let raw = answer_with(&q, vec![Record::from_rdata(n, 60, RData::A(A::new(1, 1, 1, 1)))]);
        let a = read_answer(&raw, &q).unwrap();
        assert_eq!((a.ips.len(), a.ttl), (1, 60));
    }

    fn answer_with(q: &Query, records: Vec<Record>) -> Vec<u8> {
        let mut m = Message::response(q.id(), OpCode::Query);
        m.add_query(q.question().unwrap().clone());
        m.add_answers(records);
        m.to_vec().unwrap()
    }

    #[test]
    fn answers_teach_the_chain_and_the_lowest_ttl() {
        let q = parse_query(&query_bytes("alias.example.com.", RecordType::A, 3)).unwrap();
        let n = |s: &str| Name::from_str(s).unwrap();
        let raw = answer_with(
            &q,
            vec![
                Record::from_rdata(n("alias.example.com."), 300, RData::CNAME(CNAME(n("api.example.com.")))),
                Record::from_rdata(n("api.example.com."), 30, RData::A(A::new(198, 51, 100, 10))),
                Record::from_rdata(n("api.example.com."), 60, RData::AAAA(AAAA::from_str("2001:db8:1::a").unwrap())),
                // Not on the chain: ignored.
                Record::from_rdata(n("evil.test."), 5, RData::A(A::new(6, 6, 6, 6))),
            ],
        );
        let a = read_answer(&raw, &q).unwrap();
        assert_eq!(a.names, ["alias.example.com.", "api.example.com."]);
        assert_eq!(a.cnames(), ["api.example.com."]);
        assert_eq!(a.ips, ["198.51.100.10".parse::<IpAddr>().unwrap(), "2001:db8:1::a".parse().unwrap()]);
        assert_eq!(a.ttl, 30);
        assert_eq!(a.rrtypes, ["A", "AAAA", "CNAME"]);
        // Another id, or another question: refused.
        let other = parse_query(&query_bytes("alias.example.com.", RecordType::A, 4)).unwrap();
        assert!(read_answer(&raw, &other).is_err());
        let other = parse_query(&query_bytes("evil.test.", RecordType::A, 3)).unwrap();
        assert!(read_answer(&raw, &other).is_err());
    }
}
