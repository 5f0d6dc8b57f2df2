#!/usr/bin/env python3
"""Turn a pcap of iSCSI traffic into seed corpora for the fuzz targets.

Usage: fuzz-seeds.py CAPTURE.pcap OUTDIR [PORT...]

Reads a classic pcap (tcpdump -w; Ethernet, Linux cooked v1/v2 or BSD loopback link
types), reassembles each TCP connection to one of PORTs (default 3290-3292), splits
both directions into PDUs (48-byte BHS + AHS + header digest + padded data + data
digest, digests as negotiated at login) and writes, deduplicated by content:

  OUTDIR/pdu_decode/          one initiator->target PDU per file, plus short runs of
                              consecutive PDUs, behind pdu_decode's 6-byte header
  OUTDIR/text_and_login/      per connection: its Login Requests and Login Responses
                              in text_and_login's format
  OUTDIR/cdb_dispatch/        runs of 8 consecutive SCSI commands (CDB + Data-Out)
                              in cdb_dispatch's record format
  OUTDIR/pr_out/              runs of consecutive PR IN / PR OUT / RESERVE / RELEASE
                              commands from all connections in capture order, as raw
                              records of pr_out
The input formats are described at the top of each fuzz/fuzz_targets/*.rs file.
"""
import bisect
import hashlib
import os
import struct
import sys

BHS = 48


def read_pcap(path):
    """Yields (timestamp, linktype, frame bytes)."""
    with open(path, 'rb') as f:
        data = f.read()
    magic = data[:4]
    if magic in (b'\xd4\xc3\xb2\xa1', b'\x4d\x3c\xb2\xa1'):
        end = '<'
    elif magic in (b'\xa1\xb2\xc3\xd4', b'\xa1\xb2\x3c\x4d'):
        end = '>'
    else:
        sys.exit(f'{path}: not a classic pcap file (pcapng is not supported)')
    linktype = struct.unpack(end + 'I', data[20:24])[0]
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack(end + 'IIII', data[pos:pos + 16])
        pos += 16
        yield sec + frac / 1e9, linktype, data[pos:pos + incl]
        pos += incl


def ip_payload(linktype, frame):
    """(ethertype-ish version, IP packet) or None."""
    if linktype == 1:  # Ethernet
        off, etype = 14, struct.unpack('>H', frame[12:14])[0]
        while etype == 0x8100:
            etype = struct.unpack('>H', frame[off + 2:off + 4])[0]
            off += 4
        return frame[off:] if etype in (0x0800, 0x86DD) else None
    if linktype == 113:  # Linux cooked v1
        return frame[16:]
    if linktype == 276:  # Linux cooked v2
        return frame[20:]
    if linktype in (0, 108):  # BSD loopback
        return frame[4:]
    if linktype in (101, 12):  # raw IP
        return frame
    sys.exit(f'unsupported link type {linktype}')


def tcp_segment(ip):
    """(src, sport, dst, dport, seq, flags, payload) or None."""
    if not ip:
        return None
    ver = ip[0] >> 4
    if ver == 4:
        ihl = (ip[0] & 15) * 4
        if ip[9] != 6:
            return None
        total = struct.unpack('>H', ip[2:4])[0]
        src, dst, tcp = ip[12:16], ip[16:20], ip[ihl:total]
    elif ver == 6:
        if ip[6] != 6:  # no extension headers on loopback
            return None
        plen = struct.unpack('>H', ip[4:6])[0]
        src, dst, tcp = ip[8:24], ip[24:40], ip[40:40 + plen]
    else:
        return None
    sport, dport, seq = struct.unpack('>HHI', tcp[:8])
    doff = (tcp[12] >> 4) * 4
    return src, sport, dst, dport, seq, tcp[13], tcp[doff:]


class Stream:
    """One direction of a TCP connection, reassembled by sequence number."""

    def __init__(self, isn):
        self.base = (isn + 1) & 0xffffffff
        self.segs = []

    def add(self, seq, payload, ts):
        if payload:
            self.segs.append(((seq - self.base) & 0xffffffff, payload, ts))

    def assemble(self):
        data = bytearray()
        offsets, stamps = [], []
        for off, payload, ts in sorted(self.segs, key=lambda s: s[0]):
            if off > len(data):
                break  # a hole: stop rather than guess
            new = payload[len(data) - off:]
            if new:
                offsets.append(len(data))
                stamps.append(ts)
                data += new
        return bytes(data), offsets, stamps


class Conn:
    def __init__(self, n, client, server, isn):
        self.n, self.client, self.server = n, client, server
        self.c2s = Stream(isn)
        self.s2c = None


def connections(path, ports):
    conns, current = [], {}
    for ts, lt, frame in read_pcap(path):
        seg = tcp_segment(ip_payload(lt, frame))
        if not seg:
            continue
        src, sport, dst, dport, seq, flags, payload = seg
        syn, ack = flags & 0x02, flags & 0x10
        if dport in ports and syn and not ack:
            c = Conn(len(conns), (src, sport), (dst, dport), seq)
            conns.append(c)
            current[(src, sport, dst, dport)] = c
            continue
        if sport in ports and syn and ack:
            c = current.get((dst, dport, src, sport))
            if c:
                c.s2c = Stream(seq)
            continue
        c = current.get((src, sport, dst, dport))
        if c:
            c.c2s.add(seq, payload, ts)
            continue
        c = current.get((dst, dport, src, sport))
        if c and c.s2c:
            c.s2c.add(seq, payload, ts)
    return conns


def parse_text(data):
    out = []
    for item in data.split(b'\0'):
        if b'=' in item:
            k, v = item.split(b'=', 1)
            out.append((k.decode('utf-8', 'replace'), v.decode('utf-8', 'replace')))
    return out


def split_pdus(data, login_opcode, digests):
    """Yields (offset, raw PDU bytes, opcode, ahs, data segment, digests used)."""
    pos, in_login = 0, True
    while pos + BHS <= len(data):
        bhs = data[pos:pos + BHS]
        opcode = bhs[0] & 0x3f
        if in_login and opcode != login_opcode:
            in_login = False
        hd, dd = (False, False) if in_login else digests
        ahs_len = bhs[4] * 4
        dsl = int.from_bytes(bhs[5:8], 'big')
        hlen = BHS + ahs_len + (4 if hd else 0)
        total = hlen + dsl + (-dsl % 4) + (4 if dd and dsl else 0)
        if pos + total > len(data):
            break
        raw = data[pos:pos + total]
        yield (pos, raw, opcode, raw[BHS:BHS + ahs_len], raw[hlen:hlen + dsl], (hd, dd))
        pos += total


def negotiated_digests(s2c):
    hd = dd = False
    for _, _, opcode, _, seg, _ in split_pdus(s2c, 0x23, (False, False)):
        if opcode != 0x23:
            break
        for k, v in parse_text(seg):
            if k == 'HeaderDigest':
                hd = v == 'CRC32C'
            elif k == 'DataDigest':
                dd = v == 'CRC32C'
    return hd, dd


class Writer:
    def __init__(self, outdir):
        self.outdir, self.seen, self.count = outdir, set(), {}

    def put(self, target, data, limit, sig=None, per_sig=2):
        """Write `data` unless seen; at most `per_sig` files share a signature."""
        if self.count.get(target, 0) >= limit:
            return
        if sig is not None:
            key = (target, 'sig', sig)
            if self.count.get(key, 0) >= per_sig:
                return
            self.count[key] = self.count.get(key, 0) + 1
        h = hashlib.sha1(data).hexdigest()
        if (target, h) in self.seen:
            return
        self.seen.add((target, h))
        d = os.path.join(self.outdir, target)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, h[:16]), 'wb') as f:
            f.write(data)
        self.count[target] = self.count.get(target, 0) + 1


def pdu_sig(raw):
    """What makes a PDU different for the decoder: opcode, flags, AHS, data presence,
    and for SCSI commands the CDB opcode and service action."""
    sig = (raw[0] & 0x3f, raw[1], raw[4], min(int.from_bytes(raw[5:8], 'big'), 1))
    if raw[0] & 0x3f == 0x01:
        sig += (raw[32], raw[33] & 0x1f)
    return sig


def u16le(v):
    return struct.pack('<H', v)


def u32le(v):
    return struct.pack('<I', v & 0xffffffff)


# pdu_decode: [flags: bit0 header digest, bit1 data digest][max u32 LE][chunk]
def pdu_header(digests, chunk=0):
    return bytes([int(digests[0]) | int(digests[1]) << 1]) + u32le(262144) + bytes([chunk])


# text_and_login: flags, policy (15 bytes), rng seed, u16 LE target stream length
AUTO_CHAP, AUTO_MUTUAL, I_DISCOVERY, I_CHAP, I_MUTUAL = 2, 4, 8, 16, 32
POLICY = u32le(262144 - 512) + u32le(1048576 - 512) + u32le(262144 - 512) + u16le(4) + b'\x01'


class Command:
    def __init__(self, conn, ts, nexus, lun, cdb, edtl, write, data):
        self.conn, self.ts, self.nexus, self.lun = conn, ts, nexus, lun
        self.cdb, self.edtl, self.write = cdb, edtl, write
        self.data = bytearray(data)


def cdb_record(cmd, lun_bits=True):
    op = cmd.nexus & 3
    if lun_bits:
        op |= min(cmd.lun, 2) << 2
    data = bytes(cmd.data[:cmd.edtl])
    if len(data) > 4096:
        # Too big to keep verbatim: as many copies of its first byte (the length counts
        # in units of 8).
        n = min(len(data) // 8, 0x7fff)
        body = u16le(0x8000 | n) + data[:1]
    else:
        body = u16le(len(data)) + data
    return bytes([op, len(cmd.cdb)]) + cmd.cdb + body


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, outdir = sys.argv[1], sys.argv[2]
    ports = {int(p) for p in sys.argv[3:]} or {3290, 3291, 3292}
    w = Writer(outdir)
    nexus_of = {}
    commands = []
    for c in connections(path, ports):
        if c.s2c is None:
            continue
        up, up_offs, up_ts = c.c2s.assemble()
        down, _, _ = c.s2c.assemble()
        digests = negotiated_digests(down)
        pdus = list(split_pdus(up, 0x03, digests))
        # pdu_decode: every distinct PDU, and runs of three fed in odd-sized chunks.
        for i, (_, raw, _, _, _, dg) in enumerate(pdus):
            if len(raw) <= 8192:
                w.put('pdu_decode', pdu_header(dg) + raw, 300, (dg, pdu_sig(raw)))
            run = [p for p in pdus[i:i + 3] if p[5] == dg]
            if i % 7 == 0 and sum(len(p[1]) for p in run) <= 8192:
                sig = ('run', dg) + tuple(pdu_sig(p[1]) for p in run)
                w.put('pdu_decode', pdu_header(dg, 13) + b''.join(p[1] for p in run), 300, sig)
        # text_and_login: the login requests and responses of this connection.
        reqs = [p for p in pdus if p[2] == 0x03]
        resps = [p for p in split_pdus(down, 0x23, digests) if p[2] == 0x23]
        if not reqs:
            continue
        keys = [kv for p in reqs for kv in parse_text(p[4])]
        name = next((v for k, v in keys if k == 'InitiatorName'), '')
        target = next((v for k, v in keys if k == 'TargetName'), '')
        isid = reqs[0][1][8:14]
        flags = AUTO_CHAP | AUTO_MUTUAL
        if any(k == 'SessionType' and v == 'Discovery' for k, v in keys):
            flags |= I_DISCOVERY
        if target.endswith('fuzz-chap'):
            flags |= I_CHAP | 1 << 6
        elif target.endswith('fuzz-mutual'):
            flags |= I_CHAP | I_MUTUAL | 2 << 6
        up_login = b''.join(p[1] for p in reqs)
        down_login = b''.join(p[1] for p in resps)
        if len(up_login) < 0x10000:
            w.put('text_and_login',
                  bytes([flags]) + POLICY + bytes([c.n & 0xff]) + u16le(len(up_login))
                  + up_login + down_login, 300,
                  (flags, target, len(reqs), tuple(p[1][36:38] for p in resps)), 3)
        nexus = nexus_of.setdefault((name, isid), len(nexus_of))
        # SCSI commands with their Data-Out, in capture order.
        open_cmds = {}
        for off, raw, opcode, ahs, seg, dg in pdus:
            ts = up_ts[max(0, bisect.bisect_right(up_offs, off) - 1)] if up_offs else 0
            itt = raw[16:20]
            if opcode == 0x01:
                lun = ((raw[8] & 0x3f) << 8) | raw[9]
                cdb = raw[32:48]
                if len(ahs) > 4 and ahs[2] == 1:
                    alen = int.from_bytes(ahs[0:2], 'big')
                    cdb += ahs[4:3 + alen]
                edtl = int.from_bytes(raw[20:24], 'big')
                cmd = Command(c.n, ts, nexus, lun, cdb, edtl, bool(raw[1] & 0x20), seg)
                open_cmds[itt] = cmd
                commands.append(cmd)
            elif opcode == 0x05 and itt in open_cmds:
                cmd = open_cmds[itt]
                boff = int.from_bytes(raw[40:44], 'big')
                if len(cmd.data) < boff:
                    cmd.data += bytes(boff - len(cmd.data))
                cmd.data[boff:boff + len(seg)] = seg
    commands.sort(key=lambda cm: cm.ts)
    # cdb_dispatch: runs of 8 commands; flags byte 0 (LUN 1 writable, thin, cached).
    for i in range(0, len(commands), 4):
        run = commands[i:i + 8]
        sig = tuple((cm.cdb[0], cm.cdb[1] & 0x1f, cm.nexus & 3, min(cm.lun, 2)) for cm in run)
        w.put('cdb_dispatch', b'\0' + b''.join(cdb_record(cm) for cm in run), 300, sig, 1)
    # pr_out: PR-related commands as raw records (kind 0), in runs of 10.
    pr = [cm for cm in commands if cm.cdb[:1] in (b'\x5e', b'\x5f', b'\x16', b'\x17')]
    for i in range(0, len(pr), 3):
        run = pr[i:i + 10]
        w.put('pr_out', b''.join(cdb_record(cm, lun_bits=False) for cm in run), 400)
    for t, n in sorted((t, n) for t, n in w.count.items() if isinstance(t, str)):
        print(f'{t}: {n} files')
    print(f'{len(commands)} SCSI commands ({len(pr)} PR-related)')


if __name__ == '__main__':
    main()
