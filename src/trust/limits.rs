//! What a client may send, and webpki's own limits, as the broker states them.

/// The most certificates a client may send: the leaf, up to webpki's 6 intermediates,
/// perhaps its root and a cross-signed spare. Everything sent feeds path building; more
/// is never needed and only costs.
pub const MAX_SENT_CERTIFICATES: usize = 10;

/// The most sent certificates that may share a subject name (cross-signed copies of one
/// CA). Path building tries every certificate named as the current issuer at every level,
/// so same-named certificates multiply its work: nine self-issued ones make webpki spend
/// its whole budget (200,000 steps, a third of a CPU second) on one request. With three
/// per name, the worst of ten certificates stays in the milliseconds.
pub const MAX_SENT_SAME_SUBJECT: usize = 3;

/// webpki reads certificates of at most 64 KiB; saying so beats its bare "BadDer".
pub const MAX_CERTIFICATE_BYTES: usize = 0xffff;

/// webpki's limit on intermediates in a path (`MAX_SUB_CA_COUNT`), for messages.
pub(super) const MAX_PATH_INTERMEDIATES: usize = 6;
