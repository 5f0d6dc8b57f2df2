//! A raw iSCSI peer for hostile tests: it speaks PDUs over a TcpStream with
//! `holdfast::wire`, and can send whatever bytes it likes.

use bytes::{Bytes, BytesMut};
use holdfast::wire::text::{encode_text, parse_text};
use holdfast::wire::{self, Bhs, DigestConfig, Pdu, PduDecoder, PduWriter, RESERVED_TAG};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    dec: PduDecoder,
    /// Digests used when sending (set after a login that negotiated them).
    pub digests: DigestConfig,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    next_itt: u32,
}

/// How a wait for a PDU ended.
#[derive(Debug)]
pub enum Recv {
    Pdu(Pdu),
    /// The target closed (or reset) the connection.
    Closed,
    /// Nothing within the timeout.
    Silent,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).ok();
        RawConn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            dec: PduDecoder::new(16 << 20),
            digests: DigestConfig::default(),
            cmd_sn: 0,
            exp_stat_sn: 0,
            next_itt: 0x100,
        }
    }

    pub fn itt(&mut self) -> u32 {
        self.next_itt += 1;
        self.next_itt
    }

    pub fn encode(&self, pdu: &Pdu) -> BytesMut {
        let mut out = BytesMut::new();
        wire::encode(pdu, self.digests, &mut out);
        out
    }

    /// Send `pdu` through the library's own PDU writer; a target that already closed is
    /// not an error here.
    pub async fn send(&mut self, pdu: &Pdu) {
        let mut out = PduWriter::new(self.digests);
        let _ = out.send(&mut self.stream, pdu.clone()).await;
    }

    /// Write bytes; a target that already closed is not an error here.
    pub async fn send_raw(&mut self, b: &[u8]) {
        let _ = self.stream.write_all(b).await;
    }

    /// The next PDU within `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Recv {
        let read = wire::read_pdu(&mut self.stream, &mut self.buf, &mut self.dec);
        match tokio::time::timeout(wait, read).await {
            Err(_) => Recv::Silent,
            Ok(Ok(p)) => {
                self.track(&p);
                Recv::Pdu(p)
            }
            Ok(Err(wire::ReadError::Wire(e))) => panic!("target sent an undecodable PDU: {e}"),
            Ok(Err(_)) => Recv::Closed,
        }
    }

    /// The next PDU, which must arrive within `wait`.
    pub async fn expect(&mut self, wait: Duration) -> Pdu {
        match self.recv(wait).await {
            Recv::Pdu(p) => p,
            other => panic!("expected a PDU within {wait:?}, got {other:?}"),
        }
    }

    /// Next PDU that is not an unsolicited NOP-In (answering those as a live peer would).
    pub async fn expect_reply(&mut self, wait: Duration) -> Pdu {
        loop {
            let p = self.expect(wait).await;
            if let Bhs::NopIn(n) = &p.bhs {
                if n.itt == RESERVED_TAG {
                    let ttt = n.ttt;
                    self.nop_answer(ttt).await;
                    continue;
                }
            }
            return p;
        }
    }

    fn track(&mut self, p: &Pdu) {
        let sn = match &p.bhs {
            Bhs::ScsiResponse(h) => Some(h.stat_sn),
            Bhs::NopIn(h) if h.itt != RESERVED_TAG => Some(h.stat_sn),
            Bhs::TextResponse(h) => Some(h.stat_sn),
            Bhs::LogoutResponse(h) => Some(h.stat_sn),
            Bhs::Reject(h) => Some(h.stat_sn),
            Bhs::TaskMgmtResponse(h) => Some(h.stat_sn),
            Bhs::DataIn(h) if h.status_present => Some(h.stat_sn),
            Bhs::LoginResponse(h) => Some(h.stat_sn),
            _ => None,
        };
        if let Some(sn) = sn {
            self.exp_stat_sn = sn.wrapping_add(1);
        }
    }

    /// Read (and drop) until the target closes the connection; how long that took, or
    /// None if it was still open after `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + wait;
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    pub fn login_request(&self, keys: &[(&str, &str)], csg: u8, nsg: u8, transit: bool) -> Pdu {
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Pdu::with_data(
            Bhs::LoginRequest(wire::LoginRequest {
                transit,
                continue_: false,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a],
                tsih: 0,
                itt: 1,
                cid: 0,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            encode_text(&pairs),
        )
    }

    /// One login request from the operational stage; returns the first response.
    pub async fn login_once(
        &mut self,
        keys: &[(&str, &str)],
    ) -> (wire::LoginResponse, Vec<(String, String)>) {
        let req = self.login_request(keys, 1, 3, true);
        self.send(&req).await;
        let p = self.expect(Duration::from_secs(10)).await;
        let Bhs::LoginResponse(r) = p.bhs else {
            panic!("expected a Login Response, got {:?}", p.bhs)
        };
        (r, parse_text(&p.data).unwrap_or_default())
    }

    /// A normal-session login (no authentication) straight to the full feature phase,
    /// with extra operational keys; the first keys offered define the session.
    pub async fn login(
        &mut self,
        initiator: &str,
        target: &str,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut keys = vec![
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
        ];
        keys.extend_from_slice(extra);
        let (mut r, mut all) = self.login_once(&keys).await;
        for _ in 0..4 {
            assert_eq!(
                (r.status_class, r.status_detail),
                (0, 0),
                "login refused: {all:?}"
            );
            if r.transit && r.nsg == 3 {
                self.cmd_sn = r.exp_cmd_sn;
                let hd = all
                    .iter()
                    .any(|(k, v)| k == "HeaderDigest" && v == "CRC32C");
                let dd = all.iter().any(|(k, v)| k == "DataDigest" && v == "CRC32C");
                self.digests = DigestConfig {
                    header: hd,
                    data: dd,
                };
                self.dec.digests = self.digests;
                return all;
            }
            // The target made offers of its own: accept them and ask again.
            let (r2, more) = self.login_once(&[]).await;
            r = r2;
            all.extend(more);
        }
        panic!("login did not reach the full feature phase: {all:?}");
    }

    pub fn nop_out(&mut self) -> (u32, Pdu) {
        let itt = self.itt();
        let p = Pdu::new(Bhs::NopOut(wire::NopOut {
            immediate: false,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }));
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        (itt, p)
    }

    /// Send a NOP-Out with the next CmdSN and wait for its NOP-In.
    pub async fn ping(&mut self) {
        let (itt, p) = self.nop_out();
        self.send(&p).await;
        let r = self.expect_reply(Duration::from_secs(10)).await;
        match &r.bhs {
            Bhs::NopIn(n) if n.itt == itt => {}
            other => panic!("expected NOP-In for {itt:#x}, got {other:?}"),
        }
    }

    /// Answer a target's ping.
    pub async fn nop_answer(&mut self, ttt: u32) {
        let p = Pdu::new(Bhs::NopOut(wire::NopOut {
            immediate: true,
            lun: 0,
            itt: RESERVED_TAG,
            ttt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }));
        self.send(&p).await;
    }

    /// A SCSI Command PDU (next CmdSN, LUN 0 in peripheral addressing).
    pub fn scsi_command(
        &mut self,
        itt: u32,
        cdb: &[u8],
        read: bool,
        write: bool,
        edtl: u32,
        data: Bytes,
    ) -> Pdu {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let p = Pdu::with_data(
            Bhs::ScsiCommand(wire::ScsiCommand {
                immediate: false,
                final_: true,
                read,
                write,
                attr: 1,
                lun: 0,
                itt,
                expected_data_transfer_length: edtl,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                cdb: c,
            }),
            data,
        );
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        p
    }

    pub fn data_out(&self, itt: u32, ttt: u32, offset: u32, data: Bytes, final_: bool) -> Pdu {
        Pdu::with_data(
            Bhs::DataOut(wire::DataOut {
                final_,
                lun: 0,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn: 0,
                buffer_offset: offset,
            }),
            data,
        )
    }
}

/// WRITE(16) CDB.
pub fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x8a;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// READ(16) CDB.
pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Sense key/ASC/ASCQ from a SCSI Response's data segment (fixed or descriptor format).
pub fn sense_of(data: &[u8]) -> Option<(u8, u8, u8)> {
    let s = data.get(2..)?;
    match s.first()? & 0x7f {
        0x70 | 0x71 => Some((s.get(2)? & 0x0f, *s.get(12)?, *s.get(13)?)),
        0x72 | 0x73 => Some((s.get(1)? & 0x0f, *s.get(2)?, *s.get(3)?)),
        _ => None,
    }
}
