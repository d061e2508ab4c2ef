//! What Porin's processes tell each other and the user, in one place:
//!
//! * [`flow`]: flow records shaped like Hubble's `Flow` (`api/v1/flow/flow.proto`, JSON field names
//!   as `hubble observe -o json` prints them), with verdicts, drop reasons, directions, event types
//!   and the L7 record as enums. The agent turns kernel events into them, the proxy its requests and
//!   responses; `porin observe` (and the coming Hubble API) reads them.
//! * [`backlog`]: the bounded, numbered backlog records wait in until someone asks, counting what
//!   it had to let go.
//! * [`control`]: the typed request / reply protocol every process serves on its Unix socket, one
//!   server loop and one client.
//! * [`metrics`]: the Hubble-named Prometheus metrics every process counts its flows into.
//! * [`stream`]: the proxy's record stream to its followers (protobuf frames, connections sent
//!   once per frame) and the one conversion of a proxy record into a [`flow::Flow`].
//!
//! Nothing here renders for humans (text and tables belong to the CLI) or knows HTTP, sockets of
//! the data path or the kernel's maps; drop reason numbers come from `redirect-common`.

pub mod backlog;
pub mod control;
pub mod flow;
pub mod metrics;
pub mod stream;
