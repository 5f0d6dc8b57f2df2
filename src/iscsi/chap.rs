//! CHAP (RFC 1994, CHAP_A=5 MD5) for iSCSI login. (implemented by the iscsi helper)
