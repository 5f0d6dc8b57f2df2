//! Table of RFC 7143 §13 keys and their negotiation rules. (implemented by the iscsi helper)
